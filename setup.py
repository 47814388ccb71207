"""Build the Cython gridder ``_grid`` beside the single module ``wlcnn``."""
from Cython.Build import cythonize
from setuptools import Extension, setup

# _grid.pyx uses typed memoryviews only, no NumPy C API: no NumPy headers
extensions = [Extension("_grid", ["_grid.pyx"], extra_compile_args=["-O3"])]

setup(
    py_modules=["wlcnn"],
    ext_modules=cythonize(extensions, compiler_directives={"language_level": 3}),
)
