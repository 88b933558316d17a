"""The checkpoint formats, one module each. Each format that is a file or a directory of its own has

    read(path) -> (config.json as a dict, or None; tensors in our names; names of weights stored above 4 bits)
    write(config, tensors in our names, tokenizer (a SentencePiece model), dst, ...)   (where we write it)

checkpoint.py finds a checkpoint and reads it with the module its path calls for; convert.py chooses the writer.
Reading order:

hf                  the Hugging Face layouts: dense, gaunernst int4, and (decoded on the way in, encoded on the
                    way out) AWQ, compressed-tensors and torchao's; names, renames, shards, Gemma 4's experts
config_json         transformers' config.json <-> our configs (config.py)
awq                 AutoAWQ's "gemm" int4 (unpack, encode), for hf.py
compressed_tensors  compressed-tensors' "pack-quantized" int4 (unpack, encode), for hf.py
packed_int4         the nibble packing and zero points that awq and compressed_tensors share
torchao             torchao's int4 / int8 weights (pickled or in safetensors), decoded for hf.py
gguf                llama.cpp's GGUF files (read, write; its tokenizer metadata as a SentencePiece model)
gguf_blocks         GGUF's Q4_0, Q4_1, Q4_K and Q8_0 blocks <-> our int4 / int8 pairs
orbax               Google's Flax/Orbax checkpoints (read; the config from the shapes)
"""
