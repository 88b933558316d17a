"""The checkpoint formats, one module each, every one with the same interface:

    read(path) -> (config.json as a dict, or None; tensors in our names; the names of weights stored above 4 bits)
    write(config, tensors in our names, tokenizer, dst, ...)  (where we write the format)

gguf       llama.cpp's GGUF files (read, write)
orbax      Google's Flax/Orbax checkpoints (read)
torchao    torchao's int4 / int8 weights, pickled or in safetensors (read: decoded into our int4 / int8 pairs)

checkpoint.py finds a checkpoint (a directory, a file, a hub id, the default model) and hands it to its format.
"""
