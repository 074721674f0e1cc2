"""The behavior models mu(a|s) of EMaQ (Ghasemipour, Schuurmans & Gu, 2021); models only, no data or env code.

`BehaviorModel` is the paper's (App. B, G.3): a state MLP embeds s into h; head i reads [h, a[:i]] (or Lin_i(a[:i]))
and outputs logits over `num_bins` equal-width bins of [low_i, high_i]. For speed, the D heads are stacked [D, in, out]
weights, every head's state part is computed once per state, and dimension 0 depends on the state alone.
`VAEBehaviorModel` is the VAE of prior work (App. H.1). Both scripts import this file, and its precision helpers
(`fp32_output_layer`, `bf16_copy` and mu's output layers `MU_OUTPUT`).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The paper's two architectures. MuJoCo: Appendix G ("2 hidden layers of dimension 750 ... linear embedding into a 750
# dimensional state representation ... 3 hidden layers of dimension 256 ... 40 equally sized bins"), with the raw prefix
# of App. B. Table 3 (kitchen, antmaze, adroit): App. G.3, with Lin_i(a[:i]) of size 128 and 80 bins.
PRESETS = {
    "mujoco": dict(
        state_hidden=750, state_layers=2, embed_dim=750, head_hidden=256, head_layers=3, prefix_dim=0, num_bins=40
    ),
    "table3": dict(
        state_hidden=256, state_layers=4, embed_dim=256, head_hidden=128, head_layers=1, prefix_dim=128, num_bins=80
    ),
}
PRESETS["cpu"] = PRESETS["table3"]  # the scripts' --preset cpu (not the paper's) keeps Table 3's mu
PRESETS["small"] = PRESETS["mujoco"] | dict(state_hidden=256, embed_dim=256, head_hidden=128, head_layers=1)  # CPU


@dataclass
class BehaviorConfig:
    """Everything that builds a BehaviorModel; saved beside its weights (nanoGPT's GPTConfig)."""

    obs_dim: int
    action_low: list[float]
    action_high: list[float]
    state_hidden: int = 750
    state_layers: int = 2
    embed_dim: int = 750
    head_hidden: int = 256
    head_layers: int = 3
    prefix_dim: int = 0  # 0: the raw prefix a[:i] (App. B); > 0: Lin_i(a[:i]) of this size (App. G.3)
    num_bins: int = 40


def action_bounds(action_space) -> tuple[list[float], list[float]]:
    """(low, high) of a bounded 1-D Box action space; a clear ValueError for anything else."""
    name = type(action_space).__name__
    low = getattr(action_space, "low", None)
    high = getattr(action_space, "high", None)
    problem = "" if name == "Box" and low is not None else f"({name})"
    if not problem:
        low = torch.as_tensor(low, dtype=torch.float64)
        high = torch.as_tensor(high, dtype=torch.float64)
        if low.ndim != 1:
            problem = f"shape {tuple(low.shape)} is not 1-D"
        elif not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            problem = "its bounds are infinite"
    if problem:
        raise ValueError(
            f"unsupported action space {action_space!r}: {problem}; EMaQ's behavior model supports a continuous "
            "gymnasium.spaces.Box action space of shape (act_dim,) with finite low and high."
        )
    return low.tolist(), high.tolist()


def register_action_bounds(model: nn.Module, action_low, action_high) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the bounds (finite, one non-empty shape, high > low); register low, high, and mid / half_range, which map
    actions to [-1, 1] (the heads' prefix: the paper's raw a[:i] for bounds [-1, 1]; the VAE's action space)."""
    low = torch.as_tensor(action_low, dtype=torch.float32).flatten()
    high = torch.as_tensor(action_high, dtype=torch.float32).flatten()
    if low.shape != high.shape or low.numel() == 0:
        raise ValueError(
            f"action_low {tuple(low.shape)} and action_high {tuple(high.shape)} must be non-empty and of one shape"
        )
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError("action bounds must be finite: EMaQ's behavior models need a bounded Box action space")
    if not (high > low).all():
        raise ValueError(f"every action_high must exceed action_low; got low={low.tolist()} high={high.tolist()}")
    model.register_buffer("low", low)
    model.register_buffer("high", high)
    model.register_buffer("mid", (high + low) / 2, persistent=False)
    model.register_buffer("half_range", (high - low) / 2, persistent=False)
    return low, high


def _stacked_uniform(*shape: int, fan_in: int) -> nn.Parameter:
    """nn.Linear's default initialization, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for stacked weights."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def fp32_output_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ weight + bias with an fp32 result, also under bf16 autocast: the output layers whose values are compared,
    regressed or sampled from (mu's logits, the VAE's actions, the scripts' Q values). x is [M, H] (weight [H, C]) or
    [D, M, H] (weight [D, H, C]). Like every bf16 layer it reads bf16 operands and sums in fp32; only its result is
    not rounded to bf16 (8 significant bits: a spacing of 4 to 8 at Q = 1000, 0.06 at a logit of 10)."""
    affine = torch.baddbmm if x.ndim == 3 else torch.addmm
    with torch.autocast(x.device.type, enabled=False):
        if x.dtype != torch.bfloat16:
            return affine(bias.float(), x.float(), weight.float())
        weight = weight.to(torch.bfloat16)  # bf16 operands on every device: the weights are read in bf16 too
        if x.device.type not in TWO_PRODUCTS_ON:
            return affine(bias.float(), x.float(), weight.float())
        # A bf16 matmul rounds only its result, after adding baddbmm's `input` in fp32: so the second product below is
        # the first one's rounding error, itself rounded to 2^-9 of its size. Same value as the branch above.
        rounded = (x @ weight).detach()  # the gradient flows through the second product only
        return rounded.float() + affine(-rounded, x, weight).float() + bias.float()


# Where two bf16 products beat an fp32 copy of x and an fp32 matmul (a CPU: docs/benchmarks.md); both read the same
# bf16 operands and agree to ~5e-6 of the value (tests/test_fast_update.py).
TWO_PRODUCTS_ON = ("cpu",)
MU_OUTPUT = ("head_out_w", "head_out_b", "decoder_out")  # mu's output layers (both models): fp32 in its bf16 copy


def bf16_copy(module: nn.Module, keep_fp32: tuple[str, ...]) -> nn.Module:
    """A frozen bf16 copy, but for the fp32 output layers `keep_fp32`: the target reads it (autocast would recast)."""
    module = copy.deepcopy(module).requires_grad_(False)
    for name, p in module.named_parameters():
        if name.split(".")[0] not in keep_fp32:
            p.data = p.data.to(torch.bfloat16)
    return module


# ----- One file format for both models (their save and load): weights, the constructor's configuration, the kind ------
def save_model(self, path: str) -> None:
    """Weights, configuration (`self.config`) and kind, written to a temporary file and renamed into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    blob = {"format": "emaq-behavior-model-v1", "kind": self.kind, "config": asdict(self.config)}
    try:
        torch.save(blob | {"state_dict": self.state_dict()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_model(cls, path: str, obs_dim: int | None = None, act_dim: int | None = None, map_location="cpu"):
    """Weights only (torch.load(weights_only=True)); a clear ValueError for a missing, foreign, other-kind or
    other-shape file. Files saved before the VAE existed have no kind: they are autoregressive."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        config = blob["config"]
        state = blob["state_dict"]
        kind = blob.get("kind", "autoregressive")
    except FileNotFoundError:
        raise ValueError(f"no behavior model at {path}: pass the mu.pt file that an earlier run saved") from None
    except Exception as e:  # truncated, tampered or foreign file
        problem = f"{path} is not a readable behavior-model file ({type(e).__name__})"
        raise ValueError(f"{problem}; retrain mu or pass another file") from None
    if kind != cls.kind:
        raise ValueError(
            f"{path} holds a mu of kind {kind}, but this run asks for --behavior-model {cls.kind}: pass "
            f"--behavior-model {kind}, or a mu of kind {cls.kind}"
        )
    saved_act = len(config["action_low"])
    if (obs_dim is not None and obs_dim != config["obs_dim"]) or (act_dim is not None and act_dim != saved_act):
        raise ValueError(
            f"behavior model {path} was trained for observations of dim {config['obs_dim']} and actions of dim "
            f"{saved_act}, but this data has observation dim {obs_dim} and action dim {act_dim}: pass a mu "
            f"trained on this dataset, or drop the path to pretrain one"
        )
    model = cls(**config)
    model.load_state_dict(state)
    return model


class BehaviorModel(nn.Module):
    """mu(a|s) = prod_i p(l_i | s, a[:i]) / width_i, a discretized autoregressive density (App. B)."""

    def __init__(
        self,
        obs_dim: int,
        action_low: Sequence[float],
        action_high: Sequence[float],
        state_hidden: int = 750,
        state_layers: int = 2,
        embed_dim: int = 750,
        head_hidden: int = 256,
        head_layers: int = 3,
        prefix_dim: int = 0,
        num_bins: int = 40,
    ):
        """prefix_dim=0 feeds the raw prefix a[:i] (App. B); prefix_dim>0 feeds Lin_i(a[:i]) of that size (App. G.3)."""
        super().__init__()
        low, high = register_action_bounds(self, action_low, action_high)
        positive = min(obs_dim, state_hidden, embed_dim, head_hidden, head_layers, num_bins) >= 1
        if not positive or min(state_layers, prefix_dim) < 0:
            raise ValueError("obs_dim, sizes, head_layers and num_bins must be >= 1; state_layers and prefix_dim >= 0")
        act_dim = low.numel()
        sizes = (state_hidden, state_layers, embed_dim, head_hidden, head_layers, prefix_dim, num_bins)
        self.config = BehaviorConfig(int(obs_dim), low.tolist(), high.tolist(), *sizes)
        self.obs_dim, self.act_dim, self.num_bins = int(obs_dim), act_dim, num_bins
        self.register_buffer("bin_width", (high - low) / num_bins)

        # State MLP: `state_layers` hidden ReLU layers, then a linear embedding h (App. G).
        layers = []
        width = obs_dim
        for _ in range(state_layers):
            layers += [nn.Linear(width, state_hidden), nn.ReLU()]
            width = state_hidden
        self.state_mlp = nn.Sequential(*layers, nn.Linear(width, embed_dim))

        # Head i reads [h, prefix_i]. Its first layer splits into a state part, computed once per state
        # for all heads at once, and a prefix part. A strictly lower-triangular mask (MADE) keeps head i
        # blind to a[i:].
        d, hid = act_dim, head_hidden
        prefix_width = prefix_dim or act_dim
        self.register_buffer("prefix_mask", torch.ones(d, act_dim).tril(-1).unsqueeze(-1))  # [D, A, 1]: j < i
        self.head_state = nn.Linear(embed_dim, d * hid)
        if prefix_dim:  # Lin_i(a[:i]) = a[:i] W_i + b_i   (App. G.3)
            self.lin_weight = _stacked_uniform(d, act_dim, prefix_dim, fan_in=max(act_dim, 1))
            self.lin_bias = _stacked_uniform(d, 1, prefix_dim, fan_in=max(act_dim, 1))
        self.head_prefix = _stacked_uniform(d, prefix_width, hid, fan_in=embed_dim + prefix_width)
        hidden_layers = range(head_layers - 1)
        self.head_hidden_w = nn.ParameterList([_stacked_uniform(d, hid, hid, fan_in=hid) for _ in hidden_layers])
        self.head_hidden_b = nn.ParameterList([_stacked_uniform(d, 1, hid, fan_in=hid) for _ in hidden_layers])
        self.head_out_w = _stacked_uniform(d, hid, num_bins, fan_in=hid)
        self.head_out_b = _stacked_uniform(d, 1, num_bins, fan_in=hid)

    @classmethod
    def from_preset(cls, preset: str, obs_dim: int, action_low, action_high, **overrides) -> BehaviorModel:
        """Build with the paper's sizes: preset 'mujoco' (Table 2) or 'table3' (kitchen/antmaze/adroit)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown behavior-model preset {preset!r}; choose one of {sorted(PRESETS)}")
        return cls(obs_dim, action_low, action_high, **{**PRESETS[preset], **overrides})

    # ----- pieces shared by training, density and sampling ---------------------------------------
    def _masked_prefix(self, actions: torch.Tensor) -> torch.Tensor:
        """Prefix features of every head from full actions [..., A] -> [..., D, P] (teacher forcing)."""
        actions = (actions - self.mid) / self.half_range
        if self.config.prefix_dim:
            weight = self.lin_weight * self.prefix_mask
            return torch.einsum("...a,dap->...dp", actions, weight) + self.lin_bias.squeeze(1)
        return actions.unsqueeze(-2) * self.prefix_mask.squeeze(-1)  # head i sees a[:i] and zeros after

    def _head_tail(self, x: torch.Tensor, dims) -> torch.Tensor:
        """Hidden layers after the first and the output layer of the heads `dims` (a slice or an int).

        x: [D', M, H] for a slice of heads (batched matmul), or [M, H] for one head."""
        for w, b in zip(self.head_hidden_w, self.head_hidden_b, strict=True):
            x = (torch.baddbmm(b[dims], x, w[dims]) if x.ndim == 3 else torch.addmm(b[dims], x, w[dims])).relu_()
        # The logits feed the NLL and the inverse-CDF draw: fp32 even under bf16 autocast (bf16 would round them by
        # up to 0.06 at |logit| = 10, a 6% error in the odds of a bin).
        return fp32_output_layer(x, self.head_out_w[dims], self.head_out_b[dims])

    def logits(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of every dimension, [B, D, num_bins] (eq. 62), all heads batched."""
        batch, d, hid = obs.shape[0], self.act_dim, self.config.head_hidden
        state_part = self.head_state(self.state_mlp(obs)).view(batch, d, hid)
        prefix = self._masked_prefix(actions)  # [B, D, P]
        prefix_part = torch.bmm(prefix.transpose(0, 1), self.head_prefix)  # [D, B, H]
        x = torch.relu(state_part.transpose(0, 1) + prefix_part)
        return self._head_tail(x, slice(None)).transpose(0, 1)

    def labels(self, actions: torch.Tensor) -> torch.Tensor:
        """Bin index of every coordinate; a == high falls in the last bin, out-of-range values are clamped."""
        idx = torch.floor((actions - self.low) / self.bin_width).long()
        return idx.clamp_(0, self.num_bins - 1)

    # ----- public surface ------------------------------------------------------------------------
    def loss(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of -log p(labels | s): cross-entropy with teacher forcing, summed over dimensions."""
        logits = self.logits(obs, actions).flatten(0, 1).float()
        labels = self.labels(actions).flatten()
        return F.cross_entropy(logits, labels, reduction="sum") / obs.shape[0]

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Continuous log-density log mu(a|s), [B]: bin log-probabilities minus log bin widths."""
        log_p = torch.log_softmax(self.logits(obs, actions).float(), dim=-1)
        bin_log_p = log_p.gather(-1, self.labels(actions).unsqueeze(-1)).squeeze(-1).sum(-1)
        return bin_log_p - torch.log(self.bin_width).sum()

    def sample(
        self, obs: torch.Tensor, num_samples: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """N actions per state, [B, N, A] (eqs. 63-66). Logits are divided by `temperature`; 0 takes the top bin's
        center in every dimension (given the ones before it): mu's deterministic policy."""
        # On a CPU, [B*N, 256] activations outgrow the caches: sampling a few thousand rows at a time is
        # up to 2x faster at large N. A GPU prefers one large launch.
        states_per_chunk = obs.shape[0] if obs.is_cuda else max(1, self.cpu_rows_per_chunk // num_samples)
        return torch.cat([self._sample(o, num_samples, temperature, generator) for o in obs.split(states_per_chunk)])

    cpu_rows_per_chunk = 8192

    def _sample(self, obs, n, temperature, generator):
        batch, d = obs.shape[0], self.act_dim
        hid, prefix_dim = self.config.head_hidden, self.config.prefix_dim
        state_part = self.head_state(self.state_mlp(obs)).view(batch, 1, d, hid)  # once per state
        actions = obs.new_zeros(batch, n, d)
        # One uniform per coordinate for the label (inverse CDF) and one for the point inside the bin.
        u_label = torch.rand(2, batch, n, d, device=obs.device, dtype=actions.dtype, generator=generator)
        for i in range(d):
            if i == 0:  # p(l_0 | s) does not depend on any sample: compute it for B states, not B*N
                x = state_part[:, :, 0] + (self.lin_bias[0] @ self.head_prefix[0] if prefix_dim else 0)
            else:
                prefix = (actions[..., :i] - self.mid[:i]) / self.half_range[:i]  # [B, N, i], scaled to [-1, 1]
                if prefix_dim:  # Lin_i(a[:i]) (App. G.3)
                    prefix = torch.baddbmm(self.lin_bias[i], prefix, self.lin_weight[i, :i].expand(batch, -1, -1))
                # state part (per state, broadcast over N) + prefix part, in one batched matmul
                x = torch.baddbmm(
                    state_part[:, :, i], prefix, self.head_prefix[i, : prefix.shape[-1]].expand(batch, -1, -1)
                )
            logits = self._head_tail(x.reshape(-1, hid).relu_(), i).float().view(batch, x.shape[1], self.num_bins)
            if temperature > 0:
                cdf = torch.softmax(logits / temperature, dim=-1).cumsum_(-1).expand(batch, n, -1).contiguous()
                label = torch.searchsorted(cdf, u_label[0, :, :, i : i + 1] * cdf[..., -1:], right=True).squeeze(-1)
                label = label.clamp_(max=self.num_bins - 1)
            else:
                label = logits.argmax(-1).expand(batch, n)
            # A point uniform inside the chosen bin (eq. 64 and 66); temperature 0 takes its center: deterministic.
            inside = u_label[1, :, :, i] if temperature > 0 else 0.5
            actions[..., i] = self.low[i] + (label.to(actions.dtype) + inside) * self.bin_width[i]
        return torch.minimum(torch.maximum(actions, self.low), self.high)

    kind = "autoregressive"  # of the saved file
    save = save_model
    load = classmethod(load_model)

    @property
    def floats_per_sample(self) -> int:
        """Activations of one sampled action, in floats (the EMaQ target sizes its chunks with it)."""
        return 4 * self.config.head_hidden + 3 * self.num_bins


# ----- The VAE of prior work (BCQ, BEAR, BRAC), for the paper's comparison (Appendix H.1, Figures 6, 8 and 9) -----
@dataclass
class VAEConfig:
    """Everything that builds a VAEBehaviorModel; saved beside its weights."""

    obs_dim: int
    action_low: list[float]
    action_high: list[float]
    hidden: int = 1024
    layers: int = 3
    latent_dim: int = 0  # 0: twice the action dimension (App. H.1)
    kl_weight: float = 0.5
    latent_clip: float = 0.5


def _mlp(width_in: int, hidden: int, layers: int) -> nn.Sequential:
    modules = []
    for _ in range(layers):
        modules += [nn.Linear(width_in, hidden), nn.ReLU()]
        width_in = hidden
    return nn.Sequential(*modules)


class VAEBehaviorModel(nn.Module):
    """mu(a|s) as a conditional VAE (App. H.1, the implementation of Wu et al. 2019 that BRAC benchmarks with):
    encoder q(z|s,a) and decoder of `layers` hidden ReLU layers of `hidden` units, latent size 2 x action dim,
    decoder p(a|s,z) = N(tanh(v), I), loss = reconstruction NLL + 0.5 KL. Sampling follows prior work: z from the
    prior clipped to [-0.5, 0.5], and the decoder's mean tanh(v), not a draw from N(tanh(v), I). The model works on
    actions mapped to [-1, 1] from the action space's bounds (the autoregressive model's [low, high] bins)."""

    kind = "vae"  # of the saved file
    save = save_model
    load = classmethod(load_model)

    def __init__(
        self,
        obs_dim: int,
        action_low: Sequence[float],
        action_high: Sequence[float],
        hidden: int = 1024,
        layers: int = 3,
        latent_dim: int = 0,
        kl_weight: float = 0.5,
        latent_clip: float = 0.5,
    ):
        super().__init__()
        low, high = register_action_bounds(self, action_low, action_high)
        act_dim = low.numel()
        latent_dim = latent_dim or 2 * act_dim
        self.config = VAEConfig(
            int(obs_dim), low.tolist(), high.tolist(), hidden, layers, latent_dim, kl_weight, latent_clip
        )
        self.obs_dim, self.act_dim, self.latent_dim = int(obs_dim), act_dim, latent_dim
        self.encoder = nn.Sequential(_mlp(obs_dim + act_dim, hidden, layers), nn.Linear(hidden, 2 * latent_dim))
        # The decoder's first layer is split into a state part, computed once per state, and a latent part, computed
        # per sample (the same function as one layer on [s, z]): N samples cost one state projection, not N.
        self.decoder_obs = nn.Linear(obs_dim, hidden)
        self.decoder_latent = nn.Linear(latent_dim, hidden, bias=False)
        self.decoder_hidden = _mlp(hidden, hidden, layers - 1)
        self.decoder_out = nn.Linear(hidden, act_dim)

    @property
    def floats_per_sample(self) -> int:
        """Activations of one sampled action, in floats (the EMaQ target sizes its chunks with it)."""
        return 2 * self.config.hidden * self.config.layers

    def decode(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """obs [B, S], z [B, N, L] -> the decoder's mean tanh(v) in [-1, 1], [B, N, A]."""
        x = (self.decoder_obs(obs).unsqueeze(1) + self.decoder_latent(z)).relu()
        x = self.decoder_hidden(x)
        # The actions the Q ensemble compares leave in fp32, also under bf16 autocast (as mu's logits do).
        out = fp32_output_layer(x.flatten(0, -2), self.decoder_out.weight.T, self.decoder_out.bias)
        return torch.tanh(out).view(*x.shape[:-1], self.act_dim)

    def _reconstruct(self, obs, actions, generator=None):
        """(actions mapped to [-1, 1], their reconstruction from one reparameterized z, the posterior's mean, std)."""
        unit = (actions - self.mid) / self.half_range
        mean, log_std = self.encoder(torch.cat([obs, unit.to(obs.dtype)], -1)).float().chunk(2, -1)
        std = log_std.clamp(-4, 15).exp()  # BCQ's and BRAC's clamp
        eps = torch.randn(mean.shape, device=mean.device, generator=generator)
        return unit, self.decode(obs, (mean + std * eps).unsqueeze(1)).squeeze(1), mean, std

    def _elbo_terms(self, obs, actions, generator=None):
        """(reconstruction NLL under N(tanh(v), I), KL to the prior) per sample, summed over dimensions."""
        unit, recon, mean, std = self._reconstruct(obs, actions, generator)
        nll = 0.5 * ((unit - recon) ** 2).sum(-1) + 0.5 * self.act_dim * math.log(2 * math.pi)
        kl = (0.5 * (mean**2 + std**2) - std.log() - 0.5).sum(-1)  # KL(N(mean, std) || N(0, I))
        return nll, kl

    def loss(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The loss of the code the paper used for its VAE (App. H.1: Wu et al. 2019's BRAC code, brac/bcq_agent.py,
        `_build_b_loss`): the squared reconstruction error averaged over batch and action dimensions + 0.5 x the KL to
        N(0, I) averaged over batch and latent dimensions, with one reparameterized z per sample."""
        unit, recon, mean, std = self._reconstruct(obs, actions)
        kl = -0.5 * (1 + torch.log(std**2) - mean**2 - std**2)
        return ((recon - unit) ** 2).mean() + self.config.kl_weight * kl.mean()

    @torch.no_grad()
    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor, num_z: int = 16) -> torch.Tensor:
        """A lower bound of log mu(a|s), [B]: the ELBO (KL weight 1), averaged over `num_z` draws of z from a fixed
        generator, minus the log of the [-1, 1] mapping's scale. Not exact: a VAE has no tractable density."""
        generator = torch.Generator(obs.device).manual_seed(0)
        elbo = torch.stack([-sum(self._elbo_terms(obs, actions, generator)) for _ in range(num_z)]).mean(0)
        return elbo - torch.log(self.half_range).sum()

    def sample(
        self, obs: torch.Tensor, num_samples: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """N actions per state, [B, N, A]: the decoder's mean at z ~ N(0, I) clipped to [-0.5, 0.5] (App. H.1).
        `temperature` scales z before the clip; 0 decodes z = 0, the VAE's deterministic policy."""
        z = torch.randn(obs.shape[0], num_samples, self.latent_dim, device=obs.device, generator=generator)
        z = (temperature * z).clamp(-self.config.latent_clip, self.config.latent_clip).to(obs.dtype)
        unit = self.decode(obs, z)
        return torch.minimum(torch.maximum(self.mid + self.half_range * unit, self.low), self.high)
