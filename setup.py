"""Build the Cython gridder ``_grid`` beside the single module ``wlcnn``."""
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "_grid",
        ["_grid.pyx"],
        include_dirs=[np.get_include()],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    py_modules=["wlcnn"],
    ext_modules=cythonize(extensions, compiler_directives={"language_level": 3}),
)
