"""Training checkpoints: orbax `CheckpointManager` (atomic, asynchronous, keep-N) of everything a run needs.

Each step directory holds
  state    the TrainState (parameters, EMA, optimizer state, counters, PRNG key)
  data     the data iterator's state (JSON), so a resumed run continues with the next batch
  config   the run's full config (JSON)
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run killed in the middle of a
save leaves the previous checkpoints intact and `latest_step()` never returns a partial one. Restoring into abstract
arrays with the current mesh's shardings lets a run resume on a different number of devices.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..config import config_to_dict, load_config
from .gns import GNSState
from .state import TrainState

ITEMS = ('state', 'data', 'config')


class TrainCheckpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, asynchronous: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, config, *, force: bool = False) -> bool:
        """Start saving (asynchronously); returns whether a save was started (False if `step` is already saved)."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(config_to_dict(config)))
        return self.manager.save(step, args=args, force=force)

    def wait(self) -> None:
        """Block until pending saves are complete (call before exiting)."""
        self.manager.wait_until_finished()

    def restore_config(self, step: int | None = None):
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return load_config(dict(restored.config))

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """(state, data iterator state) of `step` (default: latest), placed as `abstract_state`'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no complete checkpoint in {self.directory}')
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except ValueError as e:  # saved before the gradient noise scale joined the state?
            if 'gns' not in str(e) or 'do not match' not in str(e):
                from ..interop import CheckpointError
                raise CheckpointError(f'{self.directory}, step {step}: does not fit the model and optimizer of '
                                      f'this config (was the run started with another?): '
                                      f'{_first_lines(str(e))}') from e
            return self._restore_without_gns(abstract_state, step)
        return restored.state, dict(restored.data)

    def _restore_without_gns(self, abstract_state: TrainState, step: int) -> tuple[TrainState, dict]:
        """Everything but the GNS statistics, which start from zero (placed as `abstract_state.gns`)."""
        target = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)
                  if f.name != 'gns'}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        place = lambda value, like: jax.make_array_from_callback(like.shape, like.sharding,
                                                                 lambda idx: np.asarray(value)[idx])
        gns = jax.tree.map(place, GNSState.zeros(), abstract_state.gns)
        return TrainState(**restored.state, gns=gns), dict(restored.data)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_lines(message: str, n: int = 3) -> str:
    lines = [line for line in message.splitlines() if line.strip()]
    return '\n'.join(lines[:n]) + (f'\n… ({len(lines) - n} more lines)' if len(lines) > n else '')


def abstract_like(state: TrainState, sharding) -> TrainState:
    """Shape/dtype skeleton of `state` with every leaf given `sharding` (e.g. replicated on the current mesh)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def is_run_checkpoint_dir(path: str | Path) -> bool:
    """Whether `path` is a training run's checkpoints directory (or the run directory holding one)."""
    path = Path(path)
    path = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
    return path.is_dir() and any(p.name.isdigit() and (p / 'state').exists() for p in path.iterdir())


def load_ema_model(path: str | Path, step: int | None = None, config=None):
    """(EMA network, config) of a training run's latest (or given) checkpoint: what to sample from.

    `path` is the run directory or its checkpoints/; the config stored in the checkpoint is used unless given."""
    from ..factory import make_model
    from .optimizer import make_optimizer
    from .sharding import data_mesh, replicated
    from .state import create_train_state
    path = Path(path)
    path = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
    checkpointer = TrainCheckpointer(path, asynchronous=False)
    config = checkpointer.restore_config(step) if config is None else config
    train_model, state = create_train_state(make_model(config, initialize=False), make_optimizer(config), 0)
    restored, _ = checkpointer.restore(abstract_like(state, replicated(data_mesh())), step)
    return train_model.merge(restored.ema_params, restored.buffers, train=False), config
