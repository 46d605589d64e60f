"""An interactive explorer: pick a layer, a head, a query token and a score, see the heatmap over the image.

Everything is computed once at construction (one forward for the attention slices, one for the logit lens),
so moving a slider only redraws. `render(**state)` returns a matplotlib figure and works headlessly (tests,
scripts); `.widget` wraps it in ipywidgets dropdowns for a notebook.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .attention import query_positions, text_image_patterns, unpack
from .lens import logit_lens
from .plots import plot_image_scores
from .probe import Probe

SCORES = ("attention", "lens p(token)", "lens top-1 prob")


class AttentionExplorer:
    """Text->image attention and image-position logit lens of ONE Probe, browsable by layer/head/query.

    max_queries caps the query choices (the last text positions): the attention cache is
    layers x heads x queries x image tokens floats (24 x 14 x 32 x 3328 x 4 B = 143 MB for InternVL3-1B on
    13 tiles). token: the token whose lens probability is shown (default: the answer's first token).
    """

    def __init__(self, model, processor, probe: Probe, picture, token: Union[int, str, None] = None,
                 max_queries: int = 32, image: int = 0):
        if probe.token_map is None:
            raise ValueError("the probe has no image")
        self.picture, self.image, self.token_map = picture, image, probe.token_map
        self.tokenizer = processor.tokenizer
        x = unpack(model, probe)
        text = query_positions("text", x["input_ids"], x["image_positions"])[-max_queries:]  # [Q]
        self.query_positions = text
        self.patterns = text_image_patterns(model, probe, queries=text)  # [layers, H, Q, K]
        self.n_layers, self.n_heads = self.patterns.shape[:2]
        token = probe.input_ids[0, probe.prompt_len].item() if token is None else token
        self.lens = logit_lens(model, probe, positions="image", token=token, tokenizer=self.tokenizer,
                               top_k=1, embeddings=False)  # rows = LLM layers 0..L-1
        ids = probe.input_ids[0].tolist()
        words = self.tokenizer.convert_ids_to_tokens([ids[p] for p in text.tolist()])
        self.queries = {"last": [len(text) - 1]}
        if probe.answer_len:
            self.queries["answer"] = [i for i, p in enumerate(text.tolist()) if p >= probe.prompt_len - 1
                                      and p < len(ids) - 1]
        self.queries.update({f"{p}: {w!r}": [i] for i, (p, w) in enumerate(zip(text.tolist(), words))})
        self.token_text = self.tokenizer.convert_ids_to_tokens([self.lens.token])[0]
        self.figure = None
        self.scores: Optional[torch.Tensor] = None  # the last drawn per-image-token scores

    # ------------------------------------------------------------------------------------------ data
    def scores_for(self, layer="mean", head="mean", query="last", score: str = "attention") -> torch.Tensor:
        """Per-image-token scores [n_image_tokens] for one choice (layer/head may be an index or "mean",
        head also "max"; query is a key of `self.queries`; lens scores ignore head and query)."""
        if score == "attention":
            x = self.patterns[:, :, self.queries[query]].mean(2)  # [layers, H, K]
            x = x.mean(0) if layer == "mean" else x[int(layer)]  # [H, K]
            if head == "mean":
                return x.mean(0)
            return x.amax(0) if head == "max" else x[int(head)]
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        values = self.lens.token_probs if score == "lens p(token)" else self.lens.top_probs[:, :, 0]  # [layers, K]
        return values.mean(0) if layer == "mean" else values[self.lens.row(int(layer))]

    def render(self, layer="mean", head="mean", query="last", score: str = "attention"):
        """The heatmap over the image (tiles stitched, thumbnail beside) for one choice -> figure."""
        self.scores = self.scores_for(layer, head, query, score)
        what = {"attention": f"attention from {query}, head {head}",
                "lens p(token)": f"lens p({self.token_text!r})", "lens top-1 prob": "lens top-1 probability"}[score]
        self.figure = plot_image_scores(self.picture, self.token_map, self.scores, self.image,
                                        title=f"layer {layer}: {what}")
        return self.figure

    # ---------------------------------------------------------------------------------------- widget
    @property
    def controls(self) -> dict:
        """The ipywidgets controls (built once), by name: layer, head, query, score."""
        if not hasattr(self, "_controls"):
            import ipywidgets as w

            self._controls = dict(
                layer=w.Dropdown(options=["mean"] + list(range(self.n_layers)), value="mean", description="layer"),
                head=w.Dropdown(options=["mean", "max"] + list(range(self.n_heads)), value="mean",
                                description="head"),
                query=w.Dropdown(options=list(self.queries), value="last", description="query"),
                score=w.Dropdown(options=list(SCORES), value="attention", description="score"))
        return self._controls

    @property
    def widget(self):
        """Dropdowns + an output area that redraws on every change (a VBox to `display`)."""
        import ipywidgets as w
        import matplotlib.pyplot as plt

        if hasattr(self, "_widget"):
            return self._widget
        out = w.Output()

        def redraw(_change=None):
            fig = self.render(**{name: c.value for name, c in self.controls.items()})
            if _in_ipython():  # headless (tests, scripts): the figure is in self.figure
                from IPython.display import display

                with out:
                    out.clear_output(wait=True)
                    display(fig)
            plt.close(fig)

        for control in self.controls.values():
            control.observe(redraw, names="value")
        redraw()
        self._widget = w.VBox([w.HBox(list(self.controls.values())[:2]), w.HBox(list(self.controls.values())[2:]),
                               out])
        return self._widget


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


__all__ = ["AttentionExplorer", "SCORES"]
