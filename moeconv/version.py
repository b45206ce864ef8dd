"""The package version, in a leaf module so that any module can name it without importing the
package (whose `__init__` imports the pipeline)."""
__version__ = "0.1.0"
