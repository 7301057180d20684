"""Packaging: maps the top-level kernels/ and csrc/ folders into the adapt_engine package."""

from setuptools import setup

setup(
    packages=[
        "adapt_engine",
        "adapt_engine.remote",
        "adapt_engine.serving_workers",
        "adapt_engine.kernels",
        "adapt_engine.csrc",
    ],
    # kernels/ is importable as adapt_engine.kernels; csrc/ ships its C++/CUDA sources so the
    # just-in-time build finds them in a regular (non-editable) install too.
    package_dir={
        "adapt_engine": "adapt_engine",
        "adapt_engine.kernels": "kernels",
        "adapt_engine.csrc": "csrc",
    },
    package_data={"adapt_engine.csrc": ["*.cpp", "*.h", "*.cu", "**/*.cpp", "**/*.h", "**/*.cu"]},
    include_package_data=True,
)
