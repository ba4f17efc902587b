"""The generator: MM-DiT, flow matching, autoencoders, text encoders, SD3 import, training and sampling."""
