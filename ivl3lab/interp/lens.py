"""Logit lens: read the residual stream of every LLM layer as if it were the last one.

Each layer's output (`language.layers.{i}.hook_resid_post`, and the input embeddings before layer 0) goes
through the final RMSNorm and `lm_head`: what would the model predict if it stopped here? At text positions
this shows when the answer forms; at image-token positions it shows which words the image features are
already "closest to" (for a trained model, often object names in the right tiles).

A full vocabulary distribution per (layer, position) is large (V = 151k floats), so positions are decoded in
chunks and only the top-k and the probability of one chosen token are kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..hooks import hooks
from .attention import query_positions, unpack
from .tokenmap import TokenMap

RESID = "language.layers.{}.hook_resid_post"


@dataclass
class Lens:
    layers: list  # labels: "embed", 0, 1, ... (row order of every tensor below)
    positions: torch.Tensor  # [P] sequence positions decoded
    top_ids: torch.Tensor  # [layers, P, k]
    top_probs: torch.Tensor  # [layers, P, k]
    token_probs: Optional[torch.Tensor]  # [layers, P] probability of the chosen token, or None
    token: Optional[int] = None

    def row(self, layer: Union[int, str]) -> int:
        """Row index of a layer label: "embed", an LLM layer index, or a negative index (-1 = the last layer)."""
        if layer == "embed" or layer >= 0:
            if layer not in self.layers:
                raise ValueError(f"layer {layer!r} was not decoded (decoded: {self.layers})")
            return self.layers.index(layer)
        return [i for i, label in enumerate(self.layers) if label != "embed"][layer]

    def top_tokens(self, tokenizer, k: int = 1) -> list[list]:
        """[layers][positions] -> the top-k token strings (a string when k=1)."""
        out = []
        for ids in self.top_ids[:, :, :k].tolist():
            row = [tokenizer.convert_ids_to_tokens(pos) for pos in ids]
            out.append([r[0] if k == 1 else r for r in row])
        return out

    def table(self, tokenizer, width: int = 12) -> str:
        """Plain-text layer x position table of top-1 tokens (and their probability)."""
        tokens, probs = self.top_tokens(tokenizer), self.top_probs[:, :, 0].tolist()
        head = f"{'layer':>6} " + " ".join(f"{int(p):>{width}}" for p in self.positions)
        lines = [head]
        for label, toks, ps in zip(self.layers, tokens, probs):
            cells = " ".join(f"{(t[:width - 6] + f' {p:.3f}'):>{width}}" for t, p in zip(toks, ps))
            lines.append(f"{str(label):>6} {cells}")
        return "\n".join(lines)

    def image_scores(self, token_map: TokenMap, layer: Union[int, str] = -1, kind: str = "token") -> torch.Tensor:
        """[n_image_tokens] in token-map order, for plot_image_scores: the chosen token's probability
        (kind="token") or the top token's probability (kind="top") at one layer."""
        values = self.token_probs if kind == "token" else self.top_probs[:, :, 0]
        if values is None:
            raise ValueError('kind="token" needs logit_lens(..., token=...)')
        index = {int(p): i for i, p in enumerate(self.positions)}
        missing = [int(p) for p in token_map.positions if int(p) not in index]
        if missing:
            raise ValueError(f"{len(missing)} image positions were not decoded: use positions='image'")
        return values[self.row(layer), [index[int(p)] for p in token_map.positions]]


def resolve_token(token, tokenizer=None) -> Optional[int]:
    """A token id, a vocabulary entry ("Ġred") or text that tokenizes to exactly one token (" red")."""
    if token is None or isinstance(token, int):
        return token
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return vocab[token]
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens; pick a single token (or pass its id)")
    return ids[0]


@torch.no_grad()
def decode_residual(model, resid: torch.Tensor, k: int, token: Optional[int], chunk: int = 256):
    """resid [P, Ht] -> (top ids [P, k], top probs [P, k], token probs [P] or None) through norm + lm_head.

    Same modules, same dtype as the model's own forward, so the last layer reproduces its logits."""
    ids, probs, chosen = [], [], []
    for part in resid.split(chunk):
        p = model.lm_head(model.language.norm(part)).float().softmax(-1)  # [chunk, V]
        top = p.topk(k, dim=-1)
        ids.append(top.indices.cpu())
        probs.append(top.values.cpu())
        if token is not None:
            chosen.append(p[:, token].cpu())
    return torch.cat(ids), torch.cat(probs), torch.cat(chosen) if token is not None else None


@torch.no_grad()
def logit_lens(model, inputs, positions: Union[str, Sequence[int]] = "text", layers: Optional[Sequence[int]] = None,
               token: Union[int, str, None] = None, tokenizer=None, top_k: int = 5, embeddings: bool = True,
               chunk: int = 256) -> Lens:
    """Decode the residual stream after each LLM layer at chosen positions.

    positions: "text" (non-image positions after the image), "image" (every image token, token-map order),
    "all", "last", "answer" (a Probe's predicting positions) or explicit positions.
    token: an id or a one-token string (then pass `tokenizer`) whose probability is tracked.
    embeddings: also decode the LLM input (row "embed"): image features before any LLM layer.
    """
    x = unpack(model, inputs)
    token_id = resolve_token(token, tokenizer)  # fail before running the model
    length = x["input_ids"].shape[1]
    if positions == "image":
        pos = x["image_positions"]
    elif positions == "all":
        pos = torch.arange(length)
    else:
        pos = query_positions(positions, x["input_ids"], x["image_positions"], x["answer_len"])
    layers = list(range(model.config.text.num_layers)) if layers is None else [int(i) % model.config.text.num_layers
                                                                            for i in layers]
    names = (["hook_inputs_embeds"] if embeddings else []) + [RESID.format(i) for i in layers]
    keep, saved = pos.to(model.device), {}

    def save(resid, hook):  # keep only the decoded positions: [P, Ht] per layer, on the model's device
        saved[hook.name] = resid[0, keep].detach()

    with hooks(model, [(names, save)]):
        model(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], logits_to_keep=1)
    results = [decode_residual(model, saved[n], top_k, token_id, chunk) for n in names]
    return Lens(layers=(["embed"] if embeddings else []) + layers, positions=pos.cpu(),
                top_ids=torch.stack([r[0] for r in results]), top_probs=torch.stack([r[1] for r in results]),
                token_probs=torch.stack([r[2] for r in results]) if token_id is not None else None, token=token_id)


def plot_lens(lens: Lens, tokenizer, labels: Optional[Sequence[str]] = None, ax=None, cmap: str = "viridis"):
    """Layer x position heatmap of the top-1 probability, each cell labelled with its top token."""
    import matplotlib.pyplot as plt

    probs = lens.top_probs[:, :, 0].numpy()
    tokens = lens.top_tokens(tokenizer)
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.1 * probs.shape[1] + 2, 0.45 * probs.shape[0] + 1.5))
    shown = ax.imshow(probs, aspect="auto", cmap=cmap, vmin=0, vmax=max(float(probs.max()), 1e-6))
    for r, row in enumerate(tokens):
        for c, tok in enumerate(row):
            ax.text(c, r, tok[:8], ha="center", va="center", fontsize=7,
                    color="white" if probs[r, c] < 0.6 * probs.max() else "black")
    ax.set_yticks(range(len(lens.layers)), [str(label) for label in lens.layers])
    if labels is None:
        labels = [f"{int(p)}" for p in lens.positions]
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("layer (output of)")
    ax.set_title("logit lens: top token and its probability")
    ax.figure.colorbar(shown, ax=ax, shrink=0.8)
    return ax.figure


__all__ = ["Lens", "logit_lens", "decode_residual", "resolve_token", "plot_lens"]
