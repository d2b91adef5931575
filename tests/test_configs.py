"""Every experiment config loads by path (as ml_collections' config_flags does) and holds the paper's values."""
import importlib.util
import os

import pytest
from absl import flags
from ml_collections import config_flags

# ml_collections' config_flags loads files with the deprecated importlib load_module(); not ours to fix.
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

# Paper (Sec. 4, App. B) / official-script (scripts/run_*.py) values.
COMMON = dict(beta_schedule='linear', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000,
              model_mean_type='eps', loss_type='mse', warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999,
              ema_warmup=False, num_res_blocks=2, attn_resolutions=(16,))
CIFAR = dict(name='cifar10', tfds_name='cifar10', image_size=32, random_flip=True, ch=128, ch_mult=(1, 2, 2, 2),
             dropout=0.1, model_var_type='fixedlarge', lr=2e-4, batch_size=128, num_train_steps=800_000)
HQ = dict(image_size=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0, model_var_type='fixedsmall',
          lr=2e-5, batch_size=64)
EXPECTED = {
    'cifar10.py': CIFAR,
    'celebahq256.py': dict(HQ, name='celeb_a_hq', tfds_name='celeb_a_hq/256', random_flip=True,
                           num_train_steps=500_000),
    'lsun_church256.py': dict(HQ, name='lsun/church', tfds_name='lsun/church_outdoor', random_flip=True,
                              num_train_steps=1_200_000),
    'lsun_bedroom256.py': dict(HQ, name='lsun/bedroom', tfds_name='lsun/bedroom', random_flip=False,
                               num_train_steps=2_400_000),
    'lsun_bedroom256_large.py': dict(HQ, name='lsun/bedroom', tfds_name='lsun/bedroom', random_flip=False, ch=192,
                                     num_train_steps=1_150_000),
    'lsun_cat256.py': dict(HQ, name='lsun/cat', tfds_name='lsun/cat', random_flip=False, num_train_steps=1_800_000),
}


def _flat_values(config):
    """The fields EXPECTED talks about, from a loaded config."""
    return dict(
        name=config.data.name, tfds_name=config.data.tfds_name, image_size=config.data.image_size,
        random_flip=config.data.random_flip, ch=config.model.ch, ch_mult=tuple(config.model.ch_mult),
        num_res_blocks=config.model.num_res_blocks, attn_resolutions=tuple(config.model.attn_resolutions),
        dropout=config.model.dropout, beta_schedule=config.diffusion.beta_schedule,
        beta_start=config.diffusion.beta_start, beta_end=config.diffusion.beta_end,
        num_diffusion_timesteps=config.diffusion.num_diffusion_timesteps,
        model_mean_type=config.diffusion.model_mean_type, model_var_type=config.diffusion.model_var_type,
        loss_type=config.diffusion.loss_type, lr=config.optim.lr, warmup_steps=config.optim.warmup_steps,
        grad_clip=config.optim.grad_clip, ema_decay=config.optim.ema_decay, ema_warmup=config.optim.ema_warmup,
        batch_size=config.training.batch_size, num_train_steps=config.training.num_train_steps)


def _load_with_config_flags(path, *overrides):
    """Parses --config=<path> like `python -m ddpm_jax.main --config=...` does (config_flags reads the
    --config.* overrides from the argv given as sys_argv, sys.argv otherwise)."""
    argv = ['prog', f'--config={path}', *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', default=None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


@pytest.mark.parametrize('file_name', sorted(EXPECTED))
def test_config_loads_by_path_with_paper_values(file_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sibling import must not depend on the working directory
    config = _load_with_config_flags(os.path.join(CONFIGS_DIR, file_name), '--config.training.batch_size=32')
    assert config.training.batch_size == 32  # command-line overrides apply
    config.training.batch_size = EXPECTED[file_name]['batch_size']
    values = _flat_values(config)
    assert values == dict(COMMON, **EXPECTED[file_name])
    assert config.data.channels == 3 and config.model.resamp_with_conv


@pytest.mark.parametrize('file_name', sorted(EXPECTED))
def test_config_loads_with_importlib_and_relative_path(file_name, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location('config_under_test', os.path.join(CONFIGS_DIR, file_name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert _flat_values(module.get_config()) == dict(COMMON, **EXPECTED[file_name])
    assert module.__doc__ and 'python -m ddpm_jax.main' in module.__doc__ and file_name in module.__doc__

    monkeypatch.chdir(os.path.dirname(CONFIGS_DIR))
    relative = _load_with_config_flags(os.path.join('configs', file_name))
    assert _flat_values(relative) == dict(COMMON, **EXPECTED[file_name])


def test_configs_are_independent_copies():
    """Loading a derived config must not change what its base returns."""
    first = _load_with_config_flags(os.path.join(CONFIGS_DIR, 'lsun_bedroom256_large.py'))
    base = _load_with_config_flags(os.path.join(CONFIGS_DIR, 'lsun_bedroom256.py'))
    assert (first.model.ch, base.model.ch) == (192, 128)


def test_packaged_config_names_resolve_to_the_config_files(tmp_path, monkeypatch):
    from ddpm_jax import config_files
    monkeypatch.chdir(tmp_path)
    for file_name in ('digits.py', *sorted(EXPECTED)):
        path = config_files.resolve_config_path('ddpm_jax:' + file_name[:-3])
        assert os.path.samefile(path, os.path.join(CONFIGS_DIR, file_name))
        assert _load_with_config_flags(path).to_dict() == _load_with_config_flags(
            os.path.join(CONFIGS_DIR, file_name)).to_dict()
    assert config_files.resolve_config_argv(['main', '--config=ddpm_jax:cifar10', '--config', 'ddpm_jax:digits',
                                             '--workdir=w']) == [
        'main', '--config=' + config_files.resolve_config_path('ddpm_jax:cifar10'), '--config',
        config_files.resolve_config_path('ddpm_jax:digits'), '--workdir=w']
    assert config_files.resolve_config_path('configs/cifar10.py') == 'configs/cifar10.py'
    with pytest.raises(FileNotFoundError, match='available: .*ddpm_jax:cifar10'):
        config_files.resolve_config_path('ddpm_jax:cifar11')


def test_wheel_contains_the_configs(tmp_path):
    """A non-editable install gets configs/ as ddpm_jax/configs (setup.cfg package_dir)."""
    import glob
    import shutil
    import subprocess
    import sys
    import zipfile
    pytest.importorskip('setuptools')
    pytest.importorskip('wheel')
    source = tmp_path / 'src'   # a copy, so that the build leaves nothing in the checkout
    repo = os.path.dirname(CONFIGS_DIR)
    shutil.copytree(repo, source, ignore=shutil.ignore_patterns('.git', 'build', '*.egg-info', '__pycache__',
                                                                'workdirs', '.pytest_cache'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', str(source),
                    '-w', str(tmp_path / 'wheel')], check=True, timeout=600, capture_output=True)
    names = zipfile.ZipFile(glob.glob(str(tmp_path / 'wheel' / '*.whl'))[0]).namelist()
    for file_name in ('default.py', 'digits.py', *EXPECTED):
        assert f'ddpm_jax/configs/{file_name}' in names
    assert 'ddpm_jax/models/unet.py' in names and 'ddpm_jax/progress.py' in names


def _assignments(path, function_name):
    """{'section.key': value} of the literal assignments in the body of `function_name` of the config file at
    `path`: `config.a.b = v`, or `a.b = v` after `a = config.a`. Read from the source, so a value restated
    equal to its base is seen even though loading cannot tell it apart."""
    import ast
    tree = ast.parse(open(path).read())
    function = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function_name)
    aliases, values = {'config': ''}, {}
    for node in ast.walk(function):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = ast.unparse(node.targets[0])
        if isinstance(node.targets[0], ast.Name) and ast.unparse(node.value).startswith('config.'):
            aliases[target] = ast.unparse(node.value)[len('config.'):] + '.'
        elif isinstance(node.targets[0], ast.Attribute):
            alias, _, rest = target.partition('.')
            values[aliases[alias] + rest] = ast.literal_eval(node.value)
    return values


def _value(config, dotted_key):
    for part in dotted_key.split('.'):
        config = config[part]
    return config


# Every config file, its base (what it loads) and, for a variant, the function that sets it.
_DERIVED = [(file_name, base, 'get_config', '') for file_name, base in [
    ('cifar10.py', 'default.py'), ('celebahq256.py', 'default.py'), ('digits.py', 'default.py'),
    ('lsun_church256.py', 'celebahq256.py'), ('lsun_bedroom256.py', 'celebahq256.py'),
    ('lsun_cat256.py', 'celebahq256.py'), ('lsun_bedroom256_large.py', 'lsun_bedroom256.py')]] + [
    ('digits.py', 'digits.py', '_shrink_to_tiny', 'tiny')]


@pytest.mark.parametrize('file_name,base_name,function_name,variant', _DERIVED)
def test_configs_set_only_what_differs_from_their_base(file_name, base_name, function_name, variant):
    from ddpm_jax import config_files
    path = os.path.join(CONFIGS_DIR, file_name)
    assert f"load_sibling_config(__file__, '{base_name}')" in open(path).read() or variant
    base = config_files.load_config_file(os.path.join(CONFIGS_DIR, base_name))
    config = config_files.load_config_file(path + (f':{variant}' if variant else ''))
    values = _assignments(path, function_name)
    assert file_name == 'cifar10.py' or values   # the parser found the assignments (cifar10 is the default)
    for key, value in values.items():
        assert _value(config, key) == value, key
        assert _value(base, key) != value, f'{file_name}{":" + variant if variant else ""} restates {key}={value!r}'


def test_tiny_variant_loads_by_path_and_packaged_name():
    from ddpm_jax import config_files
    tiny = _load_with_config_flags(os.path.join(CONFIGS_DIR, 'digits.py:tiny'), '--config.training.batch_size=16')
    assert (tiny.model.ch, tiny.model.ch_mult, tiny.diffusion.num_diffusion_timesteps) == (32, (1,), 20)
    assert tiny.training.batch_size == 16
    packaged = config_files.resolve_config_path('ddpm_jax:digits:tiny')
    assert packaged == os.path.join(config_files.packaged_configs_dir(), 'digits.py') + ':tiny'
    assert config_files.load_config_file(packaged).to_dict() == _load_with_config_flags(packaged).to_dict()
    with pytest.raises(ValueError, match='unknown variant; use configs/digits.py or configs/digits.py:tiny'):
        config_files.load_config_file(os.path.join(CONFIGS_DIR, 'digits.py:huge'))
