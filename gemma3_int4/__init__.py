"""gemma3-int4: Gemma 3 and Gemma 4 with int4 weights in small, readable PyTorch.

The library behind the scripts at the top of the checkout (generate.py, chat.py, convert.py, eval.py, serve.py,
finetune.py). Nothing is imported here, so that `from gemma3_int4 import hugepages` can run before torch loads.
The README's tour gives the reading order.
"""
