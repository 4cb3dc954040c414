"""Loads a script of tools/ (not a package) as a module, for tests of what
it computes without running it. Shared by every test folder (tests/conftest.py
puts this folder on sys.path)."""
import functools
import importlib.util
import os.path as osp

TOOLS = osp.join(
    osp.dirname(osp.abspath(__file__)), '..', 'tools', 'analysis_tools')


@functools.lru_cache(maxsize=None)
def load_tool(name: str):
    """tools/analysis_tools/<name>.py as a module, loaded once."""
    spec = importlib.util.spec_from_file_location(
        name, osp.join(TOOLS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
