# Everything else is in pyproject.toml; setuptools reads cffi_modules only here.
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
