"""Training of the TVD-score autoencoder stage (``monai.networks.nets.AutoencoderKL``, 2D or 3D) as an Ignite trainer.

One Ignite iteration is one autoencoder update, followed by one discriminator update when the adversarial
term is on:

- autoencoder: ``reconstruction, z_mu, z_sigma = autoencoder(x)`` and the loss of
  :class:`common.losses.AutoencoderKLLoss` (L1 + ``kl_weight`` KL (+ perceptual)), plus, when adversarial,
  ``adversarial_weight`` times the least-squares generator term of ``monai.losses.PatchAdversarialLoss`` on
  the discriminator's logits for the reconstruction;
- discriminator (e.g. ``monai.networks.nets.PatchDiscriminator``, whose last output is the logits):
  ``0.5 * (LS(D(reconstruction.detach()), fake) + LS(D(x), real))``, as in MONAI's generative tutorials
  (``LS`` is MONAI's least-squares criterion, which scores ``leaky_relu(logits, 0.05)`` against 1 or 0).

The adversarial term is on when a discriminator is given, ``adversarial_weight > 0`` and the (1-based)
epoch is past ``adversarial_warmup_epochs``. The discriminator does not train during the warm-up either, so
that it and the generator term start together: a discriminator trained against the blurry reconstructions
of an untrained autoencoder would only have to be unlearned. During the autoencoder's step the discriminator
is in eval mode (its batch-norm statistics are not updated with fake-only batches) and its parameters are
frozen (no gradients from the generator term); it is in train mode only during its own step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import torch
from monai.engines import Trainer
from monai.engines.utils import default_metric_cmp_fn, default_prepare_batch
from monai.losses import PatchAdversarialLoss
from monai.utils import CommonKeys as Keys
from torch import nn

from common.engines.distributed import unwrap
from common.networks.modes import no_parameter_grads

# Scalars of ``engine.state.output`` besides Keys.LOSS; unused terms are 0.
SCALAR_KEYS = ("l1", "kl", "perceptual", "g_adv", "d_loss")


def _logits(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    # PatchDiscriminator returns every intermediate feature map; only the last one is the patch logits.
    if isinstance(output, (list, tuple)):
        return output[-1]
    return output


class AutoencoderKLTrainer(Trainer):
    """Ignite trainer for ``AutoencoderKL`` (a ``monai.engines.Trainer``: handlers, metrics and AMP as usual).

    Args:
        device: where to train.
        max_epochs: epochs of ``epoch_length`` iterations.
        train_data_loader: batches with an ``image`` key (or whatever ``prepare_batch`` reads).
        network: the autoencoder, returning ``(reconstruction, z_mu, z_sigma)`` (``monai.networks.nets.AutoencoderKL``).
        optimizer: the autoencoder's optimiser.
        loss_function: :class:`common.losses.AutoencoderKLLoss`, or any callable
            ``(reconstruction, z_mu, z_sigma, target) -> dict`` with ``loss``, ``l1``, ``kl`` and ``perceptual``.
        discriminator: optional patch discriminator (its output, or the last item of its output list, is logits).
        d_optimizer: the discriminator's optimiser; required with a discriminator.
        adversarial_weight: weight of the generator's adversarial term (0: off, also for the discriminator).
        adversarial_warmup_epochs: epochs trained without the adversarial term and without discriminator updates.
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        amp: mixed precision (float16 autocast and gradient scaling) on CUDA; ignored on CPU.
        optim_set_to_none: ``zero_grad(set_to_none=...)``.
        non_blocking, prepare_batch, iteration_update, postprocessing, key_train_metric, additional_metrics,
            metric_cmp_fn, train_handlers: as for MONAI trainers.

    ``engine.state.output`` holds ``image`` (the input batch), ``pred`` (the reconstruction, detached),
    ``loss`` (the autoencoder's weighted total, a detached float tensor) and :data:`SCALAR_KEYS` as floats:
    the unweighted terms ``l1``, ``kl``, ``perceptual``, ``g_adv`` (generator adversarial) and ``d_loss``
    (discriminator), 0 where a term is not in use this iteration, so that handlers can read them with
    ``monai.handlers.from_engine([...], first=True)``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        discriminator: nn.Module | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        adversarial_weight: float = 0.0,
        adversarial_warmup_epochs: int = 0,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        optim_set_to_none: bool = False,
    ):
        if discriminator is not None and d_optimizer is None:
            raise ValueError("a discriminator was given without d_optimizer; pass the optimiser of its parameters")
        if adversarial_weight < 0:
            raise ValueError(f"adversarial_weight={adversarial_weight}; expected a non-negative weight")
        if adversarial_warmup_epochs < 0:
            raise ValueError(f"adversarial_warmup_epochs={adversarial_warmup_epochs}; expected at least 0")
        use_amp = bool(amp) and torch.device(device).type == "cuda"
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            # Only on CUDA: with amp on a CPU device ``Trainer.run`` would build a CUDA GradScaler.
            amp=use_amp,
            decollate=False,
        )
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_warmup_epochs = int(adversarial_warmup_epochs)
        self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
        self.optim_set_to_none = optim_set_to_none
        self.use_amp = use_amp
        # Not ``self.scaler``: ``Trainer.run`` overwrites that attribute.
        self.g_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.d_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def _autocast(self):
        return torch.autocast("cuda") if self.use_amp else nullcontext()

    def is_adversarial_epoch(self, epoch: int) -> bool:
        """Whether (1-based) ``epoch`` trains with the adversarial term and updates the discriminator."""
        return self.discriminator is not None and self.adversarial_weight > 0 and epoch > self.adversarial_warmup_epochs

    def _iteration(self, engine, batchdata) -> dict:
        if batchdata is None:
            raise ValueError("AutoencoderKLTrainer needs a batch of images")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        adversarial = self.is_adversarial_epoch(engine.state.epoch)
        self.network.train()
        if self.discriminator is not None:
            self.discriminator.eval()

        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        # Frozen here, the discriminator runs outside its DDP wrapper (a wrapped forward whose parameters get no
        # gradient leaves DDP waiting for them).
        discriminator = unwrap(self.discriminator) if self.discriminator is not None else None
        with no_parameter_grads(discriminator if adversarial else None):
            with self._autocast():
                reconstruction, z_mu, z_sigma = self.network(images)
                terms = self.loss_function(reconstruction, z_mu, z_sigma, images)
                loss = terms["loss"].float()
                g_adv = torch.zeros((), device=loss.device)
                if adversarial:
                    logits = _logits(discriminator(reconstruction)).float()
                    g_adv = self.adversarial_loss(logits, target_is_real=True, for_discriminator=False)
                    loss = loss + self.adversarial_weight * g_adv
            self.g_scaler.scale(loss).backward()
        self.g_scaler.step(self.optimizer)
        self.g_scaler.update()

        d_loss = self._discriminator_step(reconstruction.detach(), images) if adversarial else 0.0
        return {
            Keys.IMAGE: images,
            Keys.PRED: reconstruction.detach().float(),
            Keys.LOSS: loss.detach().float(),
            "l1": float(terms["l1"].detach()),
            "kl": float(terms["kl"].detach()),
            "perceptual": float(terms["perceptual"].detach()),
            "g_adv": float(g_adv.detach()),
            "d_loss": d_loss,
        }

    def _discriminator_step(self, fake: torch.Tensor, real: torch.Tensor) -> float:
        self.discriminator.train()
        self.d_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        with self._autocast():
            fake_logits = _logits(self.discriminator(fake)).float()
            real_logits = _logits(self.discriminator(real)).float()
            loss_fake = self.adversarial_loss(fake_logits, target_is_real=False, for_discriminator=True)
            loss_real = self.adversarial_loss(real_logits, target_is_real=True, for_discriminator=True)
            d_loss = (loss_fake + loss_real) * 0.5
        self.d_scaler.scale(d_loss).backward()
        self.d_scaler.step(self.d_optimizer)
        self.d_scaler.update()
        self.discriminator.eval()
        return float(d_loss.detach())
