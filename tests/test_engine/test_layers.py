"""The house of mmsync's imports: each layer imports only those below it.

registry and utils at the bottom, then ops (the layer), cnn (builders and
conversion), datasets and models, engine (runner, checkpoints, pre-flight),
apis on top. An import that runs back up (cnn importing the engine, as the
runner in cnn/utils once made the builders export it) is a circle waiting to
happen; this reads every module's imports and fails naming the arrow.
"""
import ast
import os
import os.path as osp

import mmsync

PACKAGE = osp.dirname(osp.abspath(mmsync.__file__))
# Each part, and the parts it may import.
ALLOWED = {
    'registry': set(),
    'version': set(),
    # (_build_info: written by setup.py beside _ext, imports nothing)
    'utils': {'_build_info'},
    'ops': {'registry', 'utils'},
    'cnn': {'registry', 'utils', 'ops'},
    'datasets': {'registry'},
    'models': {'registry', 'utils', 'ops', 'cnn'},
    'engine': {'registry', 'utils', 'ops', 'cnn', 'datasets'},
    'apis': {'registry', 'utils', 'ops', 'cnn', 'engine'},
}


def mmsync_imports(path: str):
    """(line, part) of every mmsync part the module at ``path`` imports."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    # The package holding the module, e.g. ['mmsync', 'engine'].
    package = ['mmsync'] + osp.relpath(path, PACKAGE).split(os.sep)[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module.split('.') if node.module else []
            full = (
                package[:len(package) - node.level + 1] +
                module if node.level else module)
            if full[:1] != ['mmsync']:
                continue
            if len(full) > 1:
                yield node.lineno, full[1]
            else:  # from mmsync import engine / from .. import engine
                for alias in node.names:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split('.')
                if names[0] == 'mmsync' and len(names) > 1:
                    yield node.lineno, names[1]


def test_no_import_runs_back_up():
    arrows = []
    for part in ALLOWED:
        root = osp.join(PACKAGE, part)
        files = [root + '.py'] if osp.isfile(root + '.py') else [
            osp.join(d, f) for d, _, fs in os.walk(root) for f in fs
            if f.endswith('.py')
        ]
        assert files, part
        for path in files:
            for line, target in mmsync_imports(path):
                if target != part and target not in ALLOWED[part]:
                    arrows.append(f'{osp.relpath(path, PACKAGE)}:{line} '
                                  f'imports mmsync.{target}')
    assert not arrows, arrows
