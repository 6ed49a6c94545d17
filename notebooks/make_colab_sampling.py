"""Writes notebooks/colab_sampling.ipynb (nbformat 4.5, no outputs) with the json module."""
import json
import sys
from pathlib import Path

INTRO = """\
# kdiff_jax on Colab: sample the k-diffusion SRN cars model in JAX

kdiff_jax rebuilds [k-diffusion](https://github.com/crowsonkb/k-diffusion) in JAX / Flax NNX and loads its PyTorch checkpoints.
This notebook

1. installs the package (on Colab; with `jax[cuda12]` when the runtime has a GPU),
2. downloads the public 128×128 SRN cars model `cars.pth` from the HuggingFace hub (`JFoz/k-diffusion-cars`),
3. converts it to a kdiff_jax checkpoint with `convert_torch_ckpt.py`,
4. samples with three k-diffusion samplers (`dpmpp_2m`, `lms`, `dpm_2` with churn) and shows one grid per sampler,
5. shows an animation of the denoised prediction along the sampling trajectory.

Runtime → Change runtime type → **GPU** is recommended (the cars model has 49.5M parameters; CPU works, slowly).

Set `SOURCE = 'random'` to skip the download and use a tiny random-weight model made on the fly instead; that is what
the test suite runs (`tests/test_notebook.py` executes this notebook end to end), so the notebook cannot rot.
Outputs (grids, GIF, checkpoint) go to `OUT_DIR`."""

PARAMETERS = """\
# Parameters (tagged 'parameters': tests/test_notebook.py overrides these right after this cell, as papermill would).
SOURCE = 'huggingface'  # 'huggingface': the public SRN cars model (128x128); 'random': a tiny random-weight model (CI)
HF_REPO = 'JFoz/k-diffusion-cars'  # HuggingFace hub repository of the PyTorch checkpoint
HF_FILENAME = 'cars.pth'
HF_CONFIG = 'configs/cars128.py'  # its config (128x128, 49.5M parameters), relative to the repository root

N = 16  # images per sampler
BATCH_SIZE = 16  # images per compiled batch (split over all devices)
STEPS = 50  # sampling steps
SEED = 0  # sample k's noise comes from (SEED, k) alone
SAMPLERS = [  # (k-diffusion sampler name, its options)
    ('dpmpp_2m', {}),
    ('lms', {}),
    ('dpm_2', {'s_churn': 40.0, 's_noise': 1.003}),
]
ANIMATION_FPS = 10
OUT_DIR = 'notebook_out'  # grids, the GIF and the converted checkpoint go here"""

SETUP = """\
# Setup: on Colab, clone the repository and pip-install it (plus jax[cuda12] on a GPU runtime). Elsewhere (a local
# checkout, CI) nothing is installed: the package is imported from the repository root.
import os
import shutil
import subprocess
import sys
from pathlib import Path

IN_COLAB = 'google.colab' in sys.modules

# PLACEHOLDER: set this to the git URL of the kdiff_jax repository (your fork or the published one) before running
# on Colab. It is only used on Colab.
REPO_URL = 'https://github.com/YOUR-GITHUB-USER/kdiff_jax.git'

if IN_COLAB:
    REPO_DIR = Path('/content/kdiff_jax')
    if not REPO_DIR.exists():
        subprocess.run(['git', 'clone', '--depth', '1', REPO_URL, str(REPO_DIR)], check=True)
    # Colab already ships torch (needed only to read .pth files) and huggingface_hub.
    packages = [str(REPO_DIR)]
    has_gpu = (shutil.which('nvidia-smi') is not None
               and subprocess.run(['nvidia-smi'], capture_output=True).returncode == 0)
    if has_gpu:
        packages.append('jax[cuda12]>=0.10.2')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', *packages], check=True)
    os.chdir(REPO_DIR)
elif not Path('convert_torch_ckpt.py').exists() and Path('../convert_torch_ckpt.py').exists():
    os.chdir('..')  # started from notebooks/ in a local checkout: work from the repository root
if not Path('convert_torch_ckpt.py').exists():
    raise RuntimeError(f'run this notebook from the kdiff_jax repository root (cwd: {Path.cwd()})')

import jax
import kdiff_jax

print(f'kdiff_jax {kdiff_jax.__version__}, jax {jax.__version__}, devices: {jax.devices()}')
out_dir = Path(OUT_DIR).absolute()
out_dir.mkdir(parents=True, exist_ok=True)"""

SOURCE_CELL = """\
# The PyTorch checkpoint and its config: downloaded from the hub, or a tiny random-weight model made here.
if SOURCE == 'huggingface':
    from huggingface_hub import hf_hub_download

    torch_checkpoint = Path(hf_hub_download(repo_id=HF_REPO, filename=HF_FILENAME))
    config_path = Path(HF_CONFIG)
elif SOURCE == 'random':
    import json

    from kdiff_jax import load_config, make_model
    from kdiff_jax.config import to_kdiffusion_dict
    from kdiff_jax.interop import export_torch_state_dict
    from kdiff_jax.variables import saved_variables

    # A cars-like image_v1 U-Net, tiny: 16x16 RGB, 2 stages, no attention.
    tiny_config = load_config({'model': {
        'type': 'image_v1', 'input_channels': 3, 'input_size': [16, 16], 'mapping_out': 32, 'depths': [1, 1],
        'channels': [16, 32], 'self_attn_depths': [False, False], 'augment_wrapper': True, 'sigma_data': 0.5,
        'sigma_min': 0.01, 'sigma_max': 80.0}})
    model = make_model(tiny_config, seed=SEED)
    # k-diffusion zero-initialises proj_out, which would make the denoiser ignore the network: perturb it.
    key = jax.random.key(SEED)
    for path, variable in saved_variables(model).items():
        if 'proj_out' in path:
            key, subkey = jax.random.split(key)
            variable[...] = 0.05 * jax.random.normal(subkey, variable.shape, variable.dtype)
    torch_checkpoint = export_torch_state_dict(model, out_dir / 'random_tiny.pth')  # a k-diffusion state_dict
    config_path = torch_checkpoint.with_suffix('.json')  # k-diffusion's JSON config layout
    config_path.write_text(json.dumps(to_kdiffusion_dict(tiny_config), indent=2))
    del model
else:
    raise ValueError(f"SOURCE must be 'huggingface' or 'random', got {SOURCE!r}")
print(f'PyTorch checkpoint: {torch_checkpoint}\\nconfig: {config_path}')"""

CONVERT = """\
# Convert to a kdiff_jax (orbax) checkpoint with the converter CLI, then load the Karras-preconditioned denoiser.
# The converter runs on CPU (JAX_PLATFORMS=cpu): this kernel's JAX already holds the GPU's memory.
from kdiff_jax.factory import count_params
from kdiff_jax.generate import load_any_denoiser

checkpoint_dir = out_dir / 'checkpoint'
subprocess.run([sys.executable, 'convert_torch_ckpt.py', '--checkpoint', str(torch_checkpoint),
                '--config', str(config_path), '--out', str(checkpoint_dir)],
               check=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
denoiser, config = load_any_denoiser(checkpoint_dir)
print(f'{count_params(denoiser.inner_model):,} parameters, '
      f'{config.model.input_size[0]}x{config.model.input_size[1]}x{config.model.input_channels} images')"""

SAMPLE = """\
# N images with each sampler (Karras σ schedule over the model's σ range), one grid per sampler.
import numpy as np

from kdiff_jax.generate import SamplingPlan, generate
from kdiff_jax.images import make_grid, to_pil, to_uint8

try:
    from IPython.display import display
except ImportError:  # plain Python: the grids are only saved
    display = None

samples, grid_paths = {}, {}
for name, options in SAMPLERS:
    plan = SamplingPlan(name, STEPS, 'karras', config.model.sigma_min, config.model.sigma_max, None, dict(options))
    images = generate(denoiser, config, plan, N, batch_size=BATCH_SIZE, seed=SEED)
    samples[name] = images
    grid = to_pil(make_grid(to_uint8(images)))
    grid_paths[name] = out_dir / f'grid_{name}.png'
    grid.save(grid_paths[name])
    label = f'{name} {options}' if options else name
    print(f'{label}: {len(images)} images, finite: {bool(np.isfinite(images).all())}, saved {grid_paths[name]}')
    if display is not None:
        display(grid)"""

ANIMATE = """\
# Animation: the denoised prediction at every step of the first sampler (record=True), as a GIF.
from kdiff_jax.images import save_animation

animation_sampler, animation_options = SAMPLERS[0]
plan = SamplingPlan(animation_sampler, STEPS, 'karras', config.model.sigma_min, config.model.sigma_max, None,
                    dict(animation_options))
_, frames = generate(denoiser, config, plan, N, batch_size=BATCH_SIZE, seed=SEED, record=True)
gif_path = save_animation(frames, out_dir / f'trajectory_{animation_sampler}.gif', fps=ANIMATION_FPS)
print(f'{len(frames)} frames of {frames.shape[1]} images, saved {gif_path}')
try:
    from IPython.display import Image, display
except ImportError:
    pass
else:
    display(Image(filename=str(gif_path)))"""

FINAL = """\
print(f'outputs in {out_dir}:')
for path in sorted(out_dir.iterdir()):
    print(f'  {path.name}{"/" if path.is_dir() else ""}')
print(f'grids: {", ".join(str(p) for p in grid_paths.values())}')
print(f'animation: {gif_path}')
print(f'kdiff_jax checkpoint: {checkpoint_dir} (kdiff_jax.load_denoiser({str(checkpoint_dir)!r}))')"""


def lines(text):
    return text.splitlines(keepends=True)


def cell(cell_type, cell_id, text, tags=()):
    c = {'cell_type': cell_type, 'id': cell_id, 'metadata': {'tags': list(tags)} if tags else {}, 'source': lines(text)}
    if cell_type == 'code':
        c.update(execution_count=None, outputs=[])
    return c


notebook = {
    'nbformat': 4,
    'nbformat_minor': 5,
    'metadata': {
        'accelerator': 'GPU',
        'colab': {'provenance': [], 'name': 'colab_sampling.ipynb'},
        'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'},
        'language_info': {'name': 'python'},
    },
    'cells': [
        cell('markdown', 'intro', INTRO),
        cell('code', 'parameters', PARAMETERS, tags=['parameters']),
        cell('markdown', 'setup-md', '## Setup'),
        cell('code', 'setup', SETUP),
        cell('markdown', 'source-md', '## Get the PyTorch checkpoint'),
        cell('code', 'source', SOURCE_CELL),
        cell('markdown', 'convert-md', '## Convert it to a kdiff_jax checkpoint'),
        cell('code', 'convert', CONVERT),
        cell('markdown', 'sample-md', '## Sample with three samplers'),
        cell('code', 'sample', SAMPLE),
        cell('markdown', 'animate-md', '## Animation of the sampling trajectory'),
        cell('code', 'animate', ANIMATE),
        cell('markdown', 'outputs-md', '## Outputs'),
        cell('code', 'outputs', FINAL),
    ],
}

out = Path(sys.argv[1] if len(sys.argv) > 1 else 'notebooks/colab_sampling.ipynb')
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + '\n')
print(f'wrote {out}')
