"""The package's declared layers, checked by parsing every module's imports (no module is imported).

A module may import a ddpm_jax module of a lower layer, or one of its own layer through a declared edge; the
whole import graph (imports inside functions included) has no cycle. An import inside a function is only for
an optional heavy dependency (`LAZY_IMPORTS`); sibling modules are imported at the top.
"""
import ast
import os

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'ddpm_jax')

# Layer of each module (a dotted prefix covers a subpackage: 'evaluation' holds evaluation.*).
LAYERS = {
    # 0: no package imports beyond this layer; torchscript is a numpy-only reader of torch archives.
    'errors': 0, 'config_files': 0, 'schedules': 0, 'parallel': 0, 'image_grid': 0, 'progress': 0,
    'torchscript': 0, 'compile_cache': 0, 'rng_streams': 0, 'xla_cpu': 0, 'host_memory': 0,
    # 1: the diffusion core.
    'diffusion': 1, 'likelihood': 1,
    # 2: what is built on the core: losses, samplers, the score view.
    'losses': 2, 'samplers': 2, 'score': 2, 'optim': 2,
    # 3: the networks.
    'models': 3,
    # 4: data, storage, metrics, config checks.
    'data': 4, 'image_folder': 4, 'checkpoint': 4, 'checkpoint_recovery': 4, 'fid': 4, 'validation': 4,
    'workdir_lock': 4,
    # 5: the trainer and the evaluation modes.
    'train': 5, 'loop': 5, 'hooks': 5, 'evaluation': 5,
    # 6: the command lines.
    'main': 6, 'convert': 6,
}
# Imports within one layer that are allowed (importer, imported).
SAME_LAYER_EDGES = {
    ('likelihood', 'diffusion'),
    ('samplers', 'score'),
    ('validation', 'data'),
    ('data', 'image_folder'),
    ('checkpoint', 'checkpoint_recovery'),
    ('models', 'models.unet'),
    ('hooks', 'loop'),
    # the trainer wires the loop, its hooks and the evaluation sampler / test loss (one sampling path)
    ('train', 'loop'), ('train', 'hooks'), ('train', 'evaluation'),
}
# Third-party modules that may be imported inside a function: optional or heavy, needed by few code paths.
LAZY_IMPORTS = {'tensorflow', 'tensorflow_datasets', 'torch', 'tensorboardX', 'safetensors', 'matplotlib',
                'diffrax',  # only the probability-flow ODE paths need it; importing it costs ~0.4 s at every start
                'sklearn',  # only the bundled digits dataset needs scikit-learn
                # a private orbax module (its location changes between versions), used only to join its threads
                'orbax.checkpoint._src.futures'}
# The command line imports its modes when one runs, so that --help and flag errors answer without loading JAX;
# these in-function sibling imports are its only ones.
CLI_LAZY_SIBLINGS = {'main': {'train', 'parallel', 'validation', 'compile_cache'}}


def _module_files():
    """{dotted module name: path} of every module of the package ('models' for models/__init__.py)."""
    modules = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith('.py'):
                rel = os.path.relpath(os.path.join(root, name), PACKAGE_DIR)[:-3].replace(os.sep, '.')
                rel = rel[:-len('.__init__')] if rel.endswith('.__init__') else rel
                if rel != '__init__':
                    modules[rel] = os.path.join(root, name)
    return modules


MODULES = _module_files()


def _layer(module):
    """The layer of a dotted module name, from its longest declared prefix."""
    parts = module.split('.')
    for end in range(len(parts), 0, -1):
        if '.'.join(parts[:end]) in LAYERS:
            return LAYERS['.'.join(parts[:end])]
    raise KeyError(f'ddpm_jax.{module} has no declared layer; add it to LAYERS in tests/test_layers.py')


def _imports(path):
    """[(imported dotted name, inside a function?, line)] of a module; ddpm_jax names lose their prefix."""
    tree = ast.parse(open(path).read(), filename=path)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:  # `from ddpm_jax.models import unet` imports ddpm_jax.models.unet
                    submodule = f'{child.module}.{alias.name}'
                    is_module = submodule == 'ddpm_jax.' + alias.name or submodule[len('ddpm_jax.'):] in MODULES
                    found.append((submodule if is_module else child.module, in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return [(name[len('ddpm_jax.'):] if name.startswith('ddpm_jax.') else name, inside, line)
            for name, inside, line in found if name != 'ddpm_jax']


def _sibling(name):
    return name.split('.')[0] in LAYERS


def _within(name, prefix):
    return name == prefix or name.startswith(prefix + '.')


def _same_layer_edge(module, name):
    """Whether `module` may import `name` of its own layer: a declared edge (prefixes cover subpackages), or
    two modules of one subpackage (evaluation.sample -> evaluation.common; the cycle test still applies)."""
    same_package = '.' in module and module.split('.')[0] == name.split('.')[0]
    return same_package or any(_within(module, a) and _within(name, b) for a, b in SAME_LAYER_EDGES)


def _problems(module):
    """The rule violations of one module's imports, one line each."""
    problems = []
    for name, inside, line in _imports(MODULES[module]):
        if _sibling(name):
            if inside and name not in CLI_LAZY_SIBLINGS.get(module, ()):
                problems.append(f'line {line}: ddpm_jax.{name} imported inside a function; import it at the top')
            edge_allowed = _layer(name) < _layer(module) or (_layer(name) == _layer(module) and _same_layer_edge(
                module, name))
            if not edge_allowed:
                problems.append(f'line {line}: ddpm_jax.{module} (layer {_layer(module)}) imports ddpm_jax.{name} '
                                f'(layer {_layer(name)})')
        elif inside and not any(name == lazy or name.startswith(lazy + '.') for lazy in LAZY_IMPORTS):
            problems.append(f'line {line}: {name} imported inside a function; only {sorted(LAZY_IMPORTS)} may be')
    return problems


@pytest.mark.parametrize('module', sorted(MODULES))
def test_module_imports_only_lower_layers_at_the_top(module):
    assert _problems(module) == []


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_import_graph_has_no_cycle():
    graph = {m: {n for n, _, _ in _imports(path) if _sibling(n)} for m, path in MODULES.items()}
    state = {}

    def visit(module, stack):
        state[module] = 'open'
        for name in sorted(graph.get(module, ())):
            target = name if name in graph else name.split('.')[0]
            if state.get(target) == 'open':
                raise AssertionError('import cycle: ' + ' -> '.join(stack + [module, target]))
            if target not in state:
                visit(target, stack + [module])
        state[module] = 'done'

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself: an upward edge and an in-function sibling import are reported (so a pass means
    something)."""
    path = tmp_path / 'fake.py'
    path.write_text('from ddpm_jax import train\n\ndef f():\n    from ddpm_jax import schedules\n    import PIL\n')
    MODULES['diffusion_fake'] = str(path)
    LAYERS['diffusion_fake'] = 1
    try:
        problems = _problems('diffusion_fake')
    finally:
        del MODULES['diffusion_fake'], LAYERS['diffusion_fake']
    assert problems == [
        'line 1: ddpm_jax.diffusion_fake (layer 1) imports ddpm_jax.train (layer 5)',
        'line 4: ddpm_jax.schedules imported inside a function; import it at the top',
        f'line 5: PIL imported inside a function; only {sorted(LAZY_IMPORTS)} may be',
    ]
