"""Builds the Cython solvers (module `km`); netmoe.py and train_gpt.py are plain modules."""
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    name="netmoe",
    version="0.1.0",
    description="NetMoE (ICLR 2025): MoE training with dynamic sample placement",
    py_modules=["netmoe", "train_gpt", "bench"],
    ext_modules=cythonize([Extension("km", ["km.pyx"], include_dirs=[np.get_include()],
                                     extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"],
                                     language="c++")],
                          compiler_directives={"language_level": 3}),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "click"],
    # scipy: a test oracle and benchmark baseline only; matplotlib: `bench.py plot` only (its tests too);
    # pytest-xdist: the README's GPU line runs the suite in parallel workers (-n)
    extras_require={"test": ["pytest", "pytest-xdist", "scipy", "matplotlib"], "plot": ["matplotlib"]},
)
