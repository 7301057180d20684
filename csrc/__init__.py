"""C++/CUDA kernel sources, shipped as package data for the just-in-time build."""
