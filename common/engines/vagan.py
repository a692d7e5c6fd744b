"""VA-GAN's WGAN-GP map learning as an Ignite trainer (Baumgartner et al., CVPR 2018, Eq. 1-4, 3.5).

One Ignite iteration is one *generator* update, preceded by its critic updates:

- counterfactual ``y = x1 + M(x1)`` for patient images ``x1`` (class 1);
- critic loss ``mean D(x0) - mean D(y) + gp_weight * GP`` against real control images ``x0``, with
  the gradient penalty ``(||grad D(x_hat)||_2 - 1)^2`` over *all* voxels of the interpolate
  ``x_hat = e x0 + (1 - e) y`` (the TF original reduced over one axis only);
- generator loss ``mean D(y) + lambda_map * mean |M(x1)|``, with the critic evaluated afresh on
  this generator batch (the unofficial PyTorch port reused the critic's last batch);
- ``critic_steps`` (5) critic updates per generator update, ``critic_steps_boost`` (100) for the
  first ``boost_first`` (25) and every ``boost_every``-th (100th) generator update;
- optional gradient accumulation: each update averages the gradients of ``accumulation_steps``
  mini-batches (the 3D recipe: 2+2 images x 6).

The critic draws its own mini-batches from ``critic_data_loader`` (default: the training loader,
cycled), so an epoch counts generator updates. Batches are dictionaries with ``image_0`` (controls)
and ``image_1`` (patients), as :class:`common.data.pairs.ClassPairDataset` makes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext

import torch
from monai.engines import Trainer
from torch.utils.data import DataLoader

from common.data.pairs import prepare_pair_batch
from common.engines.distributed import unwrap

OUTPUT_KEYS = ("critic_loss", "generator_loss", "wasserstein", "gradient_penalty", "map_l1", "critic_steps")


def gradient_penalty(critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP penalty (Gulrajani et al.) with the gradient norm taken over every voxel of each image."""
    eps = torch.rand(real.shape[0], *([1] * (real.ndim - 1)), device=real.device, dtype=real.dtype)
    interpolate = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(interpolate).sum(), interpolate, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def critic_steps_for(
    generator_step: int, steps: int = 5, boost: int = 100, boost_first: int = 25, boost_every: int = 100
):
    """Critic updates before generator update ``generator_step`` (0-based), the paper's schedule."""
    if generator_step < boost_first or (boost_every > 0 and generator_step % boost_every == 0):
        return boost
    return steps


def _cycle(loader: Iterable) -> Iterator:
    while True:
        yield from loader


class VAGANTrainer(Trainer):
    """Ignite trainer for VA-GAN (a ``monai.engines.Trainer``: handlers, metrics and AMP as usual).

    Args:
        device: where to train.
        max_epochs: epochs of ``epoch_length`` generator updates.
        train_data_loader: batches of ``image_0`` (controls) and ``image_1`` (patients).
        generator: the map generator M.
        critic: the critic D.
        g_optimizer, c_optimizer: their optimisers (the paper: Adam, lr 1e-3, betas (0, 0.9)).
        lambda_map: weight of the L1 map regulariser (100).
        gp_weight: gradient-penalty weight (10).
        critic_steps, critic_steps_boost, boost_first, boost_every: the critic schedule (5, 100, 25, 100).
        accumulation_steps: mini-batches whose gradients make one update (1; 6 in the 3D recipe).
        critic_data_loader: where the critic's batches come from (default ``train_data_loader``).
        epoch_length: generator updates per epoch (default ``len(train_data_loader)``).
        amp: mixed precision on CUDA (the gradient penalty is computed in float32).
        train_handlers, key_train_metric, additional_metrics, postprocessing: as for MONAI trainers.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        generator: torch.nn.Module,
        critic: torch.nn.Module,
        g_optimizer: torch.optim.Optimizer,
        c_optimizer: torch.optim.Optimizer,
        lambda_map: float = 100.0,
        gp_weight: float = 10.0,
        critic_steps: int = 5,
        critic_steps_boost: int = 100,
        boost_first: int = 25,
        boost_every: int = 100,
        accumulation_steps: int = 1,
        critic_data_loader: Iterable | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_pair_batch,
        amp: bool = False,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        train_handlers: Sequence | None = None,
        optim_set_to_none: bool = True,
    ):
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            postprocessing=postprocessing,
            amp=amp,
            decollate=False,
        )
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={accumulation_steps}; expected at least 1")
        self.generator = generator
        self.critic = critic
        self.g_optimizer = g_optimizer
        self.c_optimizer = c_optimizer
        self.lambda_map = float(lambda_map)
        self.gp_weight = float(gp_weight)
        self.schedule = dict(
            steps=critic_steps, boost=critic_steps_boost, boost_first=boost_first, boost_every=boost_every
        )
        self.accumulation_steps = int(accumulation_steps)
        self.critic_batches = _cycle(train_data_loader if critic_data_loader is None else critic_data_loader)
        self.optim_set_to_none = optim_set_to_none
        use_amp = bool(amp) and torch.device(device).type == "cuda"
        self.use_amp = use_amp
        self.c_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.g_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def _autocast(self):
        return torch.autocast("cuda") if self.use_amp else nullcontext()

    def _critic_update(self, engine) -> dict[str, float]:
        self.c_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        totals = {"critic_loss": 0.0, "wasserstein": 0.0, "gradient_penalty": 0.0}
        for _ in range(self.accumulation_steps):
            x0, x1 = engine.prepare_batch(next(self.critic_batches), engine.state.device, engine.non_blocking)
            with torch.no_grad(), self._autocast():
                fake = x1 + unwrap(self.generator)(x1)
            fake = fake.float()
            with self._autocast():
                distance = self.critic(fake).float().mean() - self.critic(x0).float().mean()
            penalty = gradient_penalty(self.critic, x0, fake)  # float32: double backprop under AMP is fragile
            loss = (-distance + self.gp_weight * penalty) / self.accumulation_steps
            self.c_scaler.scale(loss).backward()
            totals["critic_loss"] += float(loss.detach()) * self.accumulation_steps
            totals["wasserstein"] += float(distance.detach())
            totals["gradient_penalty"] += float(penalty.detach())
        self.c_scaler.step(self.c_optimizer)
        self.c_scaler.update()
        return {k: v / self.accumulation_steps for k, v in totals.items()}

    def _iteration(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("VAGANTrainer needs a batch of image_0/image_1 pairs")
        step = engine.state.iteration - 1
        n_critic = critic_steps_for(step, **self.schedule)
        self.generator.train()
        self.critic.train()
        critic_stats: dict[str, float] = {}
        for _ in range(n_critic):
            critic_stats = self._critic_update(engine)

        # Generator update: the critic scores this batch's counterfactuals afresh. Frozen here, it runs outside
        # its DDP wrapper: a wrapped forward whose parameters get no gradient leaves DDP waiting for them.
        critic = unwrap(self.critic)
        for p in critic.parameters():
            p.requires_grad_(False)
        self.g_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        g_total, l1_total = 0.0, 0.0
        batches = [batchdata] + [next(self.critic_batches) for _ in range(self.accumulation_steps - 1)]
        for batch in batches:
            _, x1 = engine.prepare_batch(batch, engine.state.device, engine.non_blocking)
            with self._autocast():
                effect = self.generator(x1)
                counterfactual = x1 + effect
                map_l1 = effect.float().abs().mean()
                loss = critic(counterfactual).float().mean() + self.lambda_map * map_l1
            self.g_scaler.scale(loss / self.accumulation_steps).backward()
            g_total += float(loss.detach())
            l1_total += float(map_l1.detach())
        self.g_scaler.step(self.g_optimizer)
        self.g_scaler.update()
        for p in critic.parameters():
            p.requires_grad_(True)
        n = len(batches)
        return {
            **critic_stats,
            "generator_loss": g_total / n,
            "map_l1": l1_total / n,
            "critic_steps": n_critic,
            # Tensors for image logging (first items of the last batch).
            "image": x1[:4].detach(),
            "map": effect[:4].detach().float(),
            "counterfactual": counterfactual[:4].detach().float(),
        }
