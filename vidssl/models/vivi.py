"""VIVI -- Self-Supervised Learning of Video-Induced Visual Invariances (Tschannen et al., CVPR 2020).

A video is ``K`` consecutive shots of ``L`` frames each (``data.sampler: shots``, ``data.num_shots = K``,
``data.clip_len = L``; every frame augmented independently with ``data.per_frame_crop`` + ``data.per_frame_jitter``).
The shared encoder ``f`` maps every frame to a global-average-pooled feature ``h``; the loss is

    ``L = L_S + lambda_V * L_V (+ lambda_sup * CE on a labelled image stream, co-training)``

* ``L_S`` (frame/shot level, ``shot_loss``):

  - ``"triplet"`` (the paper's Ex(n)): a projection head ``g``, frames of one shot are positives, frames of every
    other shot of the batch negatives, batch-hard mining (hardest positive, hardest negative; not semi-hard, as in
    the Exemplar baseline VIVI builds on): :func:`vidssl.losses.triplet.batch_hard_triplet`.
  - ``"infonce"`` (ours, recommended by the spec): the same positives as a multi-positive InfoNCE over cosine
    similarities of ``g(h)`` (:func:`vidssl.losses.info_nce` with a positives mask, self excluded).
  - ``shot_negatives: other_videos`` (ours) takes the other shots of the anchor's own video out of both forms'
    negatives. The paper's shots are separated by cuts; pseudo-shots cut from one continuous take (DAVIS segments)
    are near-duplicates of their neighbours, and batch-hard mining then always picks the neighbouring segment as the
    hardest negative -- closer than a differently cropped frame of the anchor's own shot -- so the hinge is
    minimised by collapsing every embedding to one point (loss = margin; measured, configs/vivi_sample.yaml).
  - ``"rotation"`` (the paper's Rot variant): every frame rotated by 0/90/180/270 degrees (a balanced draw), a linear
    head on ``h`` predicts the rotation. The frames' features for ``L_V`` are then those of the rotated frames (one
    encoder pass; ours -- the paper does not say).

* Shot embeddings ``e = pool_l u(h_l)`` with a linear ``u`` and ``pooling`` ``"mean"`` or ``"attention"``
  (``alpha_l = softmax_l(w^T tanh(V u_l))``, weights summing to 1 over the frames of a shot).
* ``L_V`` (video level, ``video_loss``):

  - ``"order"``: shot order prediction, the K shot embeddings presented forward or reversed (labels balanced within
    the batch), an MLP on their concatenation (or an LSTM's final state, ``order_head``) predicts the direction;
    cross-entropy over the two classes (= the paper's BCE).
  - ``"permutation"``: the K!-way version (a uniformly drawn permutation of the shots, K <= 5).
  - ``"prediction"``: shot embedding prediction; an LSTM over ``e_1..e_s`` (or an MLP on ``e_s``) predicts
    ``e_{s+1}``, InfoNCE (cosine / ``sep_temperature``) against every shot embedding of the batch (the other shots
    of the same video included unless ``sep_same_video_negatives`` is false).
  - ``"none"``: ``L_S`` alone (the Ex(n) / Rot frame-level baselines).

* Co-training (``image_stream``): batches of a labelled image stream (``streams: {images: {data: {source: images,
  root: ...}}}``) go through ``f`` and a linear classifier; ``sup_weight * CE`` is added on the steps the stream
  is drawn (its ``weight`` sets the fraction of steps, its ``batch_size`` the mix inside a step).

There is no public code: every default the paper does not state is marked *ours* in :class:`VIVIParams`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from vidssl.config import ConfigError, to_dict
from vidssl.losses.contrastive import contrastive_logs, in_batch_scores, info_nce
from vidssl.losses.triplet import BatchHardTripletLoss
from vidssl.models.objective import BuildContext, DataNeeds, Objective

__all__ = ["ShotPooling", "VIVI", "VIVIParams", "order_labels", "permute_shots"]

_MAX_PERMUTATION_SHOTS = 5  # 5! = 120 classes


@dataclass
class VIVIParams:
    """VIVI hyperparameters (K = ``data.num_shots`` shots of L = ``data.clip_len`` frames; see :class:`VIVI`)."""

    shot_loss: Literal["triplet", "infonce", "rotation"] = "triplet"  #: L_S form; paper: triplet (Ex), rotation (Rot)
    margin: float = 0.5  #: triplet margin (ours; the paper does not state it)
    distance: Literal["euclidean", "sqeuclidean", "cosine"] = "euclidean"  #: triplet distance (ours)
    normalize: bool = True  #: L2-normalise g(h) before the triplet distances (ours)
    soft_margin: bool = False  #: triplet: softplus(d_p - d_n) (Hermans et al.'s soft margin) instead of the hinge
    #: L_S negatives: every other shot (paper) or only shots of other videos (ours, for pseudo-shots of one take)
    shot_negatives: Literal["all", "other_videos"] = "all"
    temperature: float = 0.1  #: infonce form's temperature (ours)
    proj_dim: int = 128  #: output of the projection head g (ours)
    proj_hidden: int = 512  #: hidden width of g, a 2-layer MLP (ours)
    pooling: Literal["mean", "attention"] = "mean"  #: shot pooling of u(h) over the L frames
    shot_dim: int = 128  #: shot embedding size, output of the linear u (ours)
    attn_dim: int = 64  #: attention pooling hidden size (V: shot_dim -> attn_dim; ours)
    video_loss: Literal["order", "permutation", "prediction", "none"] = "order"  #: L_V: SOP, K!-way SOP, SEP or none
    video_weight: float = 1.0  #: lambda_V (swept in the paper, value not stated; ours)
    order_head: Literal["mlp", "lstm"] = "mlp"  #: order classifier: MLP on the concatenation or LSTM final state
    predictor: Literal["lstm", "mlp"] = "lstm"  #: SEP predictor psi: LSTM over e_1..e_s or MLP on e_s
    hidden: int = 256  #: hidden width of the order MLP / LSTM and the predictor (ours)
    sep_temperature: float = 0.1  #: SEP InfoNCE temperature, cosine similarity (spec's toolkit default; ours)
    sep_same_video_negatives: bool = True  #: SEP: other shots of the same video are negatives (ours)
    image_stream: str = ""  #: co-training: the labelled image stream's name ("" = no co-training)
    num_classes: int = 0  #: co-training classes; 0 = the number of class folders of the stream's root
    sup_weight: float = 1.0  #: lambda_sup, weight of the supervised cross-entropy (ours)

    def validate(self, prefix: str = "") -> None:
        checks = [("margin", self.margin >= 0), ("temperature", self.temperature > 0),
                  ("sep_temperature", self.sep_temperature > 0), ("proj_dim", self.proj_dim >= 1),
                  ("proj_hidden", self.proj_hidden >= 1), ("shot_dim", self.shot_dim >= 1),
                  ("attn_dim", self.attn_dim >= 1), ("hidden", self.hidden >= 1),
                  ("video_weight", self.video_weight >= 0), ("sup_weight", self.sup_weight >= 0),
                  ("num_classes", self.num_classes >= 0)]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"{prefix}.{key}: out of range, got {getattr(self, key)!r} (temperatures and sizes "
                                  "> 0, margin and weights >= 0)")


def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``torch.randperm`` on the generator's device (it may be a CUDA generator), moved to ``device``."""
    dev = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=dev).to(device)


def order_labels(batch: int, num_classes: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B,)`` int64 class labels as balanced as ``B`` allows: a random permutation of ``0, 1, .., C-1, 0, ..``."""
    return _randperm(batch, generator, torch.device(device)) % num_classes


def permute_shots(e: torch.Tensor, labels: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Reorder the shots of every video: ``e (B, K, D)``, ``labels (B,)`` indexing ``perms (C, K)`` -> ``(B, K, D)``."""
    idx = perms.to(e.device)[labels]  # (B, K)
    return torch.gather(e, 1, einops.repeat(idx, "b k -> b k d", d=e.shape[-1]))


class ShotPooling(nn.Module):
    """Pool ``(B, K, L, D)`` frame embeddings into ``(B, K, D)`` shot embeddings.

    Args:
        dim: embedding size D.
        mode: ``"mean"`` or ``"attention"`` (``alpha_l = softmax_l(w^T tanh(V u_l))``, ``e = sum_l alpha_l u_l``).
        attn_dim: hidden size of ``V``.

    ``forward(u)`` returns ``(e, alpha)`` with ``alpha`` ``(B, K, L)`` summing to 1 over L.
    """

    def __init__(self, dim: int, mode: Literal["mean", "attention"] = "mean", attn_dim: int = 64) -> None:
        super().__init__()
        if mode not in ("mean", "attention"):
            raise ValueError(f"pooling: expected 'mean' or 'attention', got {mode!r}")
        self.mode = mode
        if mode == "attention":
            self.V = nn.Linear(dim, attn_dim)
            self.w = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if u.ndim != 4:
            raise ValueError(f"u: expected (B, K, L, D), got shape {tuple(u.shape)}")
        if self.mode == "mean":
            alpha = u.new_full(u.shape[:3], 1.0 / u.shape[2])  # (B, K, L)
        else:
            logits = rearrange(self.w(torch.tanh(self.V(u))), "b k l 1 -> b k l")  # (B, K, L)
            alpha = logits.softmax(dim=-1)  # (B, K, L)
        e = einops.einsum(alpha, u, "b k l, b k l d -> b k d")  # (B, K, D)
        return e, alpha


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


def _rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate square frames ``(N, 3, S, S)`` by ``k[i] * 90`` degrees counter-clockwise each."""
    out = x.clone()  # (N, 3, S, S)
    for r in range(1, 4):
        sel = k == r  # (N,)
        if bool(sel.any()):
            out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    return out


class VIVI(Objective):
    """VIVI objective over a shared image encoder (see the module docstring).

    Args:
        encoder: frame encoder ``(N, 3, S, S) -> (N, C, h, w)`` with ``out_channels`` C (globally average pooled).
        num_shots: K, shots per video (``data.num_shots``).
        frames_per_shot: L, frames per shot (``data.clip_len``).
        shot_loss: ``"triplet"`` (Ex), ``"infonce"`` or ``"rotation"`` (Rot).
        margin: triplet margin.
        distance: triplet distance ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"``.
        normalize: L2-normalise the projections before the triplet distances.
        soft_margin: triplet soft margin ``softplus(d_p - d_n)`` (``margin`` unused).
        shot_negatives: ``"all"`` (paper) or ``"other_videos"`` (the other shots of a video are not L_S negatives).
        temperature: InfoNCE-form temperature.
        proj_dim, proj_hidden: projection head g (2-layer MLP).
        pooling: ``"mean"`` or ``"attention"`` shot pooling.
        shot_dim: shot embedding size (the linear ``u``).
        attn_dim: attention pooling hidden size.
        video_loss: ``"order"``, ``"permutation"``, ``"prediction"`` or ``"none"``.
        video_weight: lambda_V.
        order_head: ``"mlp"`` or ``"lstm"``.
        predictor: ``"lstm"`` or ``"mlp"`` (SEP).
        hidden: hidden width of the order head and predictor.
        sep_temperature: SEP temperature.
        sep_same_video_negatives: SEP counts the other shots of the same video as negatives.
        image_stream: co-training stream name (``""``: none).
        num_classes: co-training classes (required with ``image_stream``).
        sup_weight: lambda_sup.

    ``forward(batch, generator)``: ``batch["video"]`` ``(B, K*L, 3, S, S)`` (optional ``batch["shot_ids"]``
    ``(B, K*L)``; co-training images under ``batch["streams"][image_stream]``) -> ``(loss, logs)``.
    """

    Params = VIVIParams

    @classmethod
    def data_needs(cls, params: VIVIParams, data: Any = None) -> DataNeeds:
        """Sampler ``shots``; L >= 2 frames per shot for the triplet/InfoNCE forms, K >= 2 shots for ``L_V``."""
        streams = ("main", params.image_stream) if params.image_stream else ("main",)
        return DataNeeds(streams=streams, clip_len=1 if params.shot_loss == "rotation" else 2, sampler="shots",
                         num_shots=1 if params.video_loss == "none" else 2)

    @classmethod
    def from_params(cls, encoder: nn.Module, params: VIVIParams, ctx: BuildContext) -> "VIVI":
        if ctx.data is None:
            raise ConfigError("data: VIVI reads num_shots (K) and clip_len (L) from the data section; none given")
        kw = to_dict(params)
        if params.image_stream and not params.num_classes:
            stream = ctx.streams.get(params.image_stream)
            if stream is None or not getattr(stream, "root", ""):
                raise ConfigError(f"image_stream: stream {params.image_stream!r} is not defined "
                                  "(streams: {name: {data: {source: images, root: ...}}}) or has no root")
            from vidssl.data.images import scan_image_folder

            kw["num_classes"] = len(scan_image_folder(stream.root)[1])
        return cls(encoder, num_shots=ctx.data.num_shots, frames_per_shot=ctx.data.clip_len, **kw)

    def __init__(self, encoder: nn.Module, *, num_shots: int, frames_per_shot: int,
                 shot_loss: Literal["triplet", "infonce", "rotation"] = "triplet", margin: float = 0.5,
                 distance: Literal["euclidean", "sqeuclidean", "cosine"] = "euclidean", normalize: bool = True,
                 soft_margin: bool = False, shot_negatives: Literal["all", "other_videos"] = "all",
                 temperature: float = 0.1, proj_dim: int = 128, proj_hidden: int = 512,
                 pooling: Literal["mean", "attention"] = "mean", shot_dim: int = 128, attn_dim: int = 64,
                 video_loss: Literal["order", "permutation", "prediction", "none"] = "order",
                 video_weight: float = 1.0, order_head: Literal["mlp", "lstm"] = "mlp",
                 predictor: Literal["lstm", "mlp"] = "lstm", hidden: int = 256, sep_temperature: float = 0.1,
                 sep_same_video_negatives: bool = True, image_stream: str = "", num_classes: int = 0,
                 sup_weight: float = 1.0) -> None:
        super().__init__()
        if shot_loss not in ("triplet", "infonce", "rotation"):
            raise ValueError(f"shot_loss: expected triplet, infonce or rotation, got {shot_loss!r}")
        if shot_negatives not in ("all", "other_videos"):
            raise ValueError(f"shot_negatives: expected all or other_videos, got {shot_negatives!r}")
        if video_loss not in ("order", "permutation", "prediction", "none"):
            raise ValueError(f"video_loss: expected order, permutation, prediction or none, got {video_loss!r}")
        if order_head not in ("mlp", "lstm") or predictor not in ("lstm", "mlp"):
            raise ValueError(f"order_head / predictor: expected mlp|lstm, got {order_head!r} / {predictor!r}")
        if num_shots < 1 or frames_per_shot < 1:
            raise ValueError(f"num_shots and frames_per_shot: must be >= 1, got {num_shots}, {frames_per_shot}")
        if shot_loss != "rotation" and frames_per_shot < 2:
            raise ValueError(f"data.clip_len: the {shot_loss} form of L_S needs >= 2 frames per shot (positives), "
                             f"got {frames_per_shot}")
        if video_loss != "none" and num_shots < 2:
            raise ValueError(f"data.num_shots: video_loss={video_loss!r} needs >= 2 shots per video, got {num_shots}")
        if video_loss == "permutation" and num_shots > _MAX_PERMUTATION_SHOTS:
            raise ValueError(f"data.num_shots: the K!-way permutation task allows K <= {_MAX_PERMUTATION_SHOTS}, "
                             f"got {num_shots}")
        if image_stream and num_classes < 2:
            raise ValueError(f"num_classes: co-training on {image_stream!r} needs >= 2 classes, got {num_classes}")
        self.encoder = encoder
        self.num_shots, self.frames_per_shot = int(num_shots), int(frames_per_shot)
        self.shot_loss, self.video_loss = shot_loss, video_loss
        self.normalize, self.temperature = bool(normalize), float(temperature)
        self.shot_negatives = shot_negatives
        self.video_weight, self.sup_weight = float(video_weight), float(sup_weight)
        self.order_head_kind, self.predictor_kind = order_head, predictor
        self.sep_temperature, self.sep_same_video_negatives = float(sep_temperature), bool(sep_same_video_negatives)
        self.image_stream = image_stream
        c = int(encoder.out_channels)
        if shot_loss == "rotation":
            self.rotation_head = nn.Linear(c, 4)
        else:
            self.proj = _mlp(c, proj_hidden, proj_dim)  # g
            self.triplet = BatchHardTripletLoss(margin, distance, soft=soft_margin)
        if video_loss != "none":
            self.u = nn.Linear(c, shot_dim)
            self.pool = ShotPooling(shot_dim, pooling, attn_dim)
        k = self.num_shots
        if video_loss in ("order", "permutation"):
            perms = [list(range(k)), list(range(k))[::-1]] if video_loss == "order" else \
                [list(p) for p in itertools.permutations(range(k))]
            self.register_buffer("perms", torch.tensor(perms, dtype=torch.int64), persistent=False)  # (C, K)
            if order_head == "mlp":
                self.order_head = _mlp(k * shot_dim, hidden, len(perms))
            else:
                self.order_lstm = nn.LSTM(shot_dim, hidden, batch_first=True)
                self.order_head = nn.Linear(hidden, len(perms))
        if video_loss == "prediction":
            if predictor == "lstm":
                self.pred_lstm = nn.LSTM(shot_dim, hidden, batch_first=True)
                self.pred_out = nn.Linear(hidden, shot_dim)
            else:
                self.pred_out = _mlp(shot_dim, hidden, shot_dim)
        if image_stream:
            self.classifier = nn.Linear(c, num_classes)

    # ------------------------------------------------------------------------------------------------ pieces

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` -> ``(N, C)``: the encoder's output, globally average pooled."""
        return einops.reduce(self.encoder(frames), "n c h w -> n c", "mean")

    def shot_embeddings(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h (B, K*L, C)`` -> shot embeddings ``(B, K, D)`` and pooling weights ``(B, K, L)``."""
        u = self.u(rearrange(h, "b (k l) c -> b k l c", k=self.num_shots))  # (B, K, L, D)
        return self.pool(u)

    def order_logits(self, e: torch.Tensor) -> torch.Tensor:
        """``(B, K, D)`` shot embeddings in presented order -> ``(B, C)`` order-class logits."""
        if self.order_head_kind == "mlp":
            return self.order_head(rearrange(e, "b k d -> b (k d)"))  # (B, C)
        _, (state, _) = self.order_lstm(e)  # state (1, B, H)
        return self.order_head(state[0])  # (B, C)

    def _shot_level(self, h: torch.Tensor, shot_ids: torch.Tensor, rot: torch.Tensor | None,
                    video_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """L_S over ``h (N, C)`` with shot labels ``(N,)`` (rotation: the rotation classes ``rot (N,)``); with
        ``shot_negatives="other_videos"`` the frames' videos ``video_ids (N,)`` take same-video shots out."""
        if self.shot_loss == "rotation":
            logits = self.rotation_head(h)  # (N, 4)
            loss = F.cross_entropy(logits, rot)  # ()
            return loss, {"loss": float(loss.detach()), "rot_acc": float((logits.argmax(1) == rot).float().mean())}
        z = self.proj(h)  # (N, P)
        same_shot = shot_ids[:, None] == shot_ids[None, :]  # (N, N)
        ignore = None
        if self.shot_negatives == "other_videos":
            if video_ids is None:
                raise ValueError("shot_negatives='other_videos' needs the video of every frame (video_ids (N,))")
            ignore = (video_ids[:, None] == video_ids[None, :]) & ~same_shot  # (N, N) other shots, same video
        if self.shot_loss == "triplet":
            return self.triplet(F.normalize(z, dim=-1) if self.normalize else z, shot_ids, ignore)
        scores, _ = in_batch_scores(z, z, temperature=self.temperature, normalize=True)  # (N, N)
        valid = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)  # (N, N) not self
        if ignore is not None:
            valid &= ~ignore
        positives = same_shot & valid  # (N, N)
        loss, n = info_nce(scores, positives, valid=valid)
        return loss, contrastive_logs(loss, n, scores, positives, valid)

    def _video_level(self, e: torch.Tensor, generator: torch.Generator | None,
                     item_videos: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """L_V over shot embeddings ``e (B, K, D)`` in temporal order; ``item_videos (B,)``: each item's source video
        (default: every item its own), for ``sep_same_video_negatives=False``."""
        b, k, _ = e.shape
        if item_videos is None:
            item_videos = torch.arange(b, device=e.device)  # (B,)
        if self.video_loss in ("order", "permutation"):
            labels = order_labels(b, self.perms.shape[0], generator, e.device)  # (B,)
            logits = self.order_logits(permute_shots(e, labels, self.perms))  # (B, C)
            loss = F.cross_entropy(logits, labels)
            return loss, {"loss": float(loss.detach()),
                          "order_acc": float((logits.argmax(1) == labels).float().mean()),
                          "chance": 1.0 / self.perms.shape[0]}
        context = e[:, :-1]  # (B, K-1, D): e_1 .. e_{K-1}
        if self.predictor_kind == "lstm":
            out, _ = self.pred_lstm(context)  # (B, K-1, H): state after e_1..e_s
            pred = self.pred_out(out)  # (B, K-1, D)
        else:
            pred = self.pred_out(context)  # (B, K-1, D)
        query = rearrange(pred, "b s d -> (b s) d")  # (B*(K-1), D)
        keys = rearrange(e, "b k d -> (b k) d")  # (B*K, D)
        item_q = einops.repeat(torch.arange(b, device=e.device), "b -> (b s)", s=k - 1)  # (B*(K-1),)
        target = item_q * k + einops.repeat(torch.arange(1, k, device=e.device), "s -> (b s)", b=b)  # next shot
        with torch.autocast(e.device.type, enabled=False):
            scores = einops.einsum(F.normalize(query.float(), dim=-1), F.normalize(keys.float(), dim=-1),
                                   "q d, m d -> q m") / self.sep_temperature  # (B*(K-1), B*K)
        valid = None
        if not self.sep_same_video_negatives:
            vid_q = einops.repeat(item_videos, "b -> (b s)", s=k - 1)  # (B*(K-1),)
            vid_k = einops.repeat(item_videos, "b -> (b k)", k=k)  # (B*K,)
            valid = vid_q[:, None] != vid_k[None, :]  # (B*(K-1), B*K) shots of other source videos
            valid[torch.arange(len(target), device=e.device), target] = True
        loss, n = info_nce(scores, target, valid=valid)
        logs = contrastive_logs(loss, n, scores, target, valid)
        return loss, {"loss": logs["loss"], "sep_top1": logs["top1"], "num_candidates": logs["num_candidates"]}

    def _batch_shot_ids(self, batch: dict[str, Any], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shot and video labels ``(B*K*L,)`` of every frame of the batch from the item-local shot ids ``(B, K*L)``.

        With the data layer's ``video_index (B,)`` and ``shots (B, K, 2)`` a shot is identified by its source video
        and first frame, so two items of one video in a batch (``clips_per_video > 1``) that drew the same shot give
        its frames one label (positives, not negatives of each other) and share a video label. Without them, every
        item is its own video.
        """
        b, t = ids.shape
        vids, ranges = batch.get("video_index"), batch.get("shots")
        if vids is None or ranges is None:
            vids, shot = torch.arange(b, device=ids.device), ids  # (B,), (B, K*L) item-local shot
        else:
            vids = torch.as_tensor(vids, device=ids.device).long()  # (B,)
            shot = torch.gather(ranges.to(ids.device)[..., 0].long(), 1, ids)  # (B, K*L) first frame of the shot
        key = torch.stack([einops.repeat(vids, "b -> b t", t=t), shot], dim=-1)  # (B, K*L, 2) (video, shot)
        shot_ids = torch.unique(rearrange(key, "b t two -> (b t) two"), dim=0, return_inverse=True)[1]  # (B*K*L,)
        return shot_ids, einops.repeat(vids, "b -> (b t)", t=t)

    # ------------------------------------------------------------------------------------------------ forward

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None):
        """``batch["video"]: (B, K*L, 3, S, S)`` -> ``(loss, logs)``."""
        video = batch["video"]
        kl = self.num_shots * self.frames_per_shot
        if video.ndim != 5 or video.shape[1] != kl:
            raise ValueError(f"batch['video']: expected (B, K*L={kl}, 3, S, S) for K={self.num_shots} shots of "
                             f"L={self.frames_per_shot} frames (data.num_shots, data.clip_len), got "
                             f"{tuple(video.shape)}")
        b = video.shape[0]
        frames = rearrange(video, "b t c h w -> (b t) c h w")  # (B*K*L, 3, S, S)
        rot = None
        if self.shot_loss == "rotation":
            if frames.shape[-1] != frames.shape[-2]:
                raise ValueError(f"batch['video']: rotation needs square frames, got {tuple(frames.shape[-2:])}")
            rot = order_labels(frames.shape[0], 4, generator, frames.device)  # (B*K*L,) balanced rotations
            frames = _rotate(frames, rot)
        h = self.frame_features(frames)  # (B*K*L, C)
        ids = batch.get("shot_ids")
        if ids is None:
            ids = einops.repeat(torch.arange(self.num_shots, device=video.device), "k -> b (k l)", b=b,
                                l=self.frames_per_shot)  # (B, K*L)
        ids = ids.to(video.device)  # (B, K*L) shot of every frame within its item
        shot_ids, video_ids = self._batch_shot_ids(batch, ids)  # (B*K*L,) each
        loss_s, s_logs = self._shot_level(h, shot_ids, rot, video_ids)
        logs = {f"shot/{k}": v for k, v in s_logs.items()}
        total = loss_s
        if self.video_loss != "none":
            e, _ = self.shot_embeddings(rearrange(h, "(b t) c -> b t c", b=b))  # (B, K, D)
            item_videos = rearrange(video_ids, "(b t) -> b t", b=b)[:, 0]  # (B,) source video of each item
            loss_v, v_logs = self._video_level(e, generator, item_videos)
            total = total + self.video_weight * loss_v
            logs.update({f"video/{k}": v for k, v in v_logs.items()})
        images = batch.get("streams", {}).get(self.image_stream) if self.image_stream else None
        if images is not None:
            x = images["video"]  # (B2, 1, 3, S, S)
            logits = self.classifier(self.frame_features(rearrange(x, "b t c h w -> (b t) c h w")))  # (B2, classes)
            labels = images["label"].to(logits.device)  # (B2,)
            if logits.shape[0] != labels.shape[0]:
                raise ValueError(f"streams.{self.image_stream}: 1-frame items expected, got video {tuple(x.shape)}")
            loss_sup = F.cross_entropy(logits, labels)
            total = total + self.sup_weight * loss_sup
            logs.update({"sup/loss": float(loss_sup.detach()),
                         "sup/acc": float((logits.argmax(1) == labels).float().mean()),
                         "sup/items": float(labels.shape[0]), "main_frames": float(frames.shape[0])})
        logs["loss"] = float(total.detach())
        return total, logs

    def extra_repr(self) -> str:
        return (f"K={self.num_shots}, L={self.frames_per_shot}, shot_loss={self.shot_loss}, "
                f"video_loss={self.video_loss}, video_weight={self.video_weight}, "
                f"image_stream={self.image_stream!r}")
