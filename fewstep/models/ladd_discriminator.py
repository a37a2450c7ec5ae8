"""LADD's discriminator: a frozen transformer's image-token block features (read with forward
hooks; DiT or Flux, see ``fewstep.models.token_features``) plus light trainable heads conditioned
on text and noise level (Sauer et al. 2024, arXiv:2403.12015, §3; heads as ADD / StyleGAN-T:
per-token logits with a projection onto the condition)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from fewstep.models.dit import TIMESTEP_FREQ_DIM, timestep_embedding
from fewstep.models.token_features import TokenFeatures


class _StopForward(Exception):
    """Raised by the hook of the deepest captured block to skip the rest of the network."""


def resolve_blocks(indices: Sequence[int] | None, depth: int) -> list[int]:
    """Block indices (negative from the end; None = every block) -> sorted, unique, checked."""
    if indices is None:
        return list(range(depth))
    out = []
    for i in indices:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(
                f"LADD feature_blocks: block {i} does not exist in a teacher with {depth} blocks "
                f"(use indices in [-{depth}, {depth - 1}])."
            )
        out.append(j)
    if not out:
        raise ValueError("LADD feature_blocks: give at least one block index (or null for all).")
    return sorted(set(out))


@contextmanager
def capture_block_outputs(
    blocks: Sequence[nn.Module], indices: Sequence[int], stop_after_last: bool = False
) -> Iterator[dict[int, Any]]:
    """Forward hooks recording the outputs of ``blocks[i]`` for i in ``indices`` into the yielded
    dict while the context is open; with ``stop_after_last`` the forward is cut after the deepest
    one (the caller must run it through ``run_until_captured``)."""
    captured: dict[int, Any] = {}
    last = max(indices)

    def make_hook(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            captured[i] = output  # block i's output (tokens [B, N, D], or a tuple of streams)
            if stop_after_last and i == last:
                raise _StopForward

        return hook

    handles = [blocks[i].register_forward_hook(make_hook(i)) for i in indices]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def token_features(net: nn.Module, owner: str, fix: str = "") -> TokenFeatures:
    """``net.token_features()`` (fewstep DiT and Flux describe their blocks), or one clear
    TypeError starting with ``owner`` and ending with ``fix``."""
    describe = getattr(net, "token_features", None)
    if not callable(describe):
        raise TypeError(
            f"{owner}: the network {type(net).__name__} has no token_features() naming the blocks "
            "to read discriminator features from (use fewstep.models.dit.DiT or "
            f"fewstep.models.flux.Flux){fix}"
        )
    return describe()


def block_features(
    features: TokenFeatures,
    call: Callable[[], object],
    indices: Sequence[int],
    latent_hw: Sequence[int],
    stop_after_last: bool = True,
) -> list[Tensor]:
    """Image-token features [B, N, D] (N = the token grid of ``latent_hw``) of
    ``features.blocks[i]`` for each i in ``indices`` while ``call()`` runs the network; the blocks
    after the deepest one are skipped when ``stop_after_last``."""
    gh, gw = features.grid(latent_hw)
    with capture_block_outputs(features.blocks, indices, stop_after_last) as captured:
        try:
            call()
        except _StopForward:
            pass
    return [features.image_tokens(captured[i], gh * gw) for i in indices]


def network_features(
    net: nn.Module,
    features: TokenFeatures,
    call: Callable[[], Tensor],
    indices: Sequence[int],
    latent_hw: Sequence[int],
    stop_after_last: bool = True,
) -> list[Tensor]:
    """``block_features`` of the network ``net`` that ``call()`` runs. When ``net`` is an FSDP
    unit its forward runs to the end and its output stays in the graph of anything built on the
    features (0 x its mean is added to the first): FSDP1 runs a unit's backward from its output,
    where it registers the hooks that gather the unit's weights again."""
    whole = isinstance(net, FSDP)
    out: list[Tensor] = []
    found = block_features(
        features, lambda: out.append(call()), indices, latent_hw, stop_after_last and not whole
    )
    if whole:
        found[0] = found[0] + 0.0 * out[0].mean().to(found[0].dtype)
    return found


def pooled_text(text: Tensor, text_mask: Tensor) -> Tensor:
    """Masked mean of text embeddings [B, L, D] over valid tokens -> [B, D] (LADD §3 pooling)."""
    mask = text_mask.to(text.dtype)[..., None]  # [B, L, 1]
    return (text * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class DiscriminatorCondition(nn.Module):
    """The heads' condition c = SiLU(W_t emb(noise level) + W_y pooled text) (LADD §3)."""

    def __init__(self, text_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.time = nn.Sequential(
            nn.Linear(TIMESTEP_FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )
        self.text = nn.Linear(text_dim, cond_dim)
        self.act = nn.SiLU()

    def forward(self, model_time: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """Network timesteps [B], text [B, L, Dt], mask [B, L] -> condition [B, cond_dim]."""
        temb = timestep_embedding(model_time.reshape(-1))  # [B, 256]
        dtype = self.text.weight.dtype
        pooled = pooled_text(text, text_mask).to(dtype)  # [B, Dt]
        return self.act(self.time(temb.to(dtype)) + self.text(pooled))


class TokenHead(nn.Module):
    """One LADD head: LayerNorm -> token MLP -> conv over the token grid -> per-token logit plus a
    projection <h, W c> / sqrt(H) onto the condition (projection discriminator, Miyato & Koyama
    2018, as StyleGAN-T / ADD heads)."""

    def __init__(self, dim: int, cond_dim: int, hidden: int = 128, kernel_size: int = 3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2)
        self.act = nn.LeakyReLU(0.2)
        self.out = nn.Linear(hidden, 1)
        self.cmap = nn.Linear(cond_dim, hidden)
        self.hidden = hidden

    def forward(self, tokens: Tensor, grid_hw: tuple[int, int], cond: Tensor) -> Tensor:
        """Tokens [B, N, D] on a gh x gw grid, condition [B, Dc] -> logits [B, N]."""
        b, n, _ = tokens.shape
        gh, gw = grid_hw
        h = self.act(self.proj(self.norm(tokens.to(self.proj.weight.dtype))))  # [B, N, H]
        grid = h.transpose(1, 2).reshape(b, self.hidden, gh, gw)  # [B, N, H] -> [B, H, gh, gw]
        h = h + self.act(self.conv(grid)).flatten(2).transpose(1, 2)  # [B, H, gh, gw] -> [B, N, H]
        projection = (h * self.cmap(cond)[:, None]).sum(-1) / self.hidden**0.5  # [B, N]
        return self.out(h).squeeze(-1) + projection  # [B, N, 1] -> [B, N]


class FeatureDiscriminatorHeads(nn.Module):
    """One TokenHead per captured teacher block plus the shared condition embedding (LADD §3)."""

    def __init__(
        self,
        num_heads: int,
        feature_dim: int,
        text_dim: int,
        cond_dim: int = 128,
        hidden: int = 128,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.condition = DiscriminatorCondition(text_dim, cond_dim)
        self.heads = nn.ModuleList(
            TokenHead(feature_dim, cond_dim, hidden, kernel_size) for _ in range(num_heads)
        )

    def forward(
        self,
        features: Sequence[Tensor],
        grid_hw: tuple[int, int],
        model_time: Tensor,
        text: Tensor,
        text_mask: Tensor,
    ) -> list[Tensor]:
        """Block features (each [B, N, D]) -> per-head token logits (each [B, N], float32 so the
        hinge losses stay exact under mixed precision)."""
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        cond = self.condition(model_time, text, text_mask)  # [B, Dc]
        heads = zip(self.heads, features, strict=True)
        return [head(f, grid_hw, cond).float() for head, f in heads]


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Inside the context ``module``'s leaf parameters do not require grad (each flag restored
    after), so a loss built there gives them no gradient (as Lightning's toggle_optimizer). Under
    FSDP (use_orig_params) an unsharded unit's parameters are views of its flat parameter, not
    leaves, and cannot be flagged: FSDP takes their flags from the original parameters, which the
    StudentModule's ``toggled_optimizer`` freezes for the other optimiser's step, so they are left
    alone here."""
    params = [p for p in module.parameters() if p.is_leaf]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
