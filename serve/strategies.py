"""Routing strategies: request text -> expert name (or None = unknown -> the fallback).

Plain classes with no Ray in them, so they are unit-testable and the router deployment
only wires them up. Each `route(text)` returns (name or None, detail dict for the response).

- explicit: never guesses (requests must name a model; `auto` goes to the fallback);
- keywords: case-insensitive substring hits per expert, most hits wins (ties -> None);
- prompt: the base model scores each domain label after a classification prompt (as in
  seed 000's `classify_prompt`), label log-likelihoods calibrated by subtracting each label's
  log-likelihood for a content-free request (Zhao et al., 2021, "Calibrate before use");
- classifier: the small hashed-n-gram classifier from `raylib.serve.classifier`;
- cem: every auto request goes to the composed expert `raylib cem` wrote.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from raylib.serve.config import RouterConfig

log = logging.getLogger("raylib.serve")


class Strategy(ABC):
    name = "?"

    @abstractmethod
    def route(self, text: str) -> tuple[str | None, dict]:
        """(expert name or None for "no opinion", details for the response/logs)."""


class Explicit(Strategy):
    name = "explicit"

    def route(self, text):
        return None, {}


class Keywords(Strategy):
    name = "keywords"

    def __init__(self, keywords: dict[str, list[str]]):
        self.keywords = {n: [w.lower() for w in ws] for n, ws in keywords.items()}

    def route(self, text):
        low = text.lower()
        hits = {n: sum(low.count(w) for w in ws) for n, ws in self.keywords.items()}
        best = max(hits.values(), default=0)
        winners = [n for n, h in hits.items() if h == best]
        if best == 0 or len(winners) > 1:
            return None, {"hits": hits}
        return winners[0], {"hits": hits}


class Cem(Strategy):
    name = "cem"

    def __init__(self, expert: str):
        self.expert = expert

    def route(self, text):
        return self.expert, {}


class ClassifierStrategy(Strategy):
    name = "classifier"

    def __init__(self, path: str, names: list[str], min_confidence: float):
        from raylib.serve.classifier import Classifier

        self.clf, self.names, self.min_confidence = Classifier(path), set(names), min_confidence

    def route(self, text):
        label, p = self.clf.predict(text)
        detail = {"label": label, "confidence": round(p, 4)}
        if label not in self.names or p < self.min_confidence:
            return None, detail
        return label, detail


class PromptClassifier(Strategy):
    """The base model as a zero/few-shot classifier: argmax over labels of
    log p(label | prompt(request)) - log p(label | prompt(content-free))."""

    name = "prompt"
    CONTENT_FREE = "N/A"

    def __init__(self, base_model: str, names: list[str], cfg: RouterConfig, dtype: str = "auto"):
        import torch

        from raylib.config import ModelConfig
        from raylib.models import load_model, load_tokenizer

        mcfg = ModelConfig(path=base_model, dtype=dtype)
        self.tok = load_tokenizer(mcfg)
        self.model = load_model(mcfg, inference=True).eval()
        self.cfg = cfg
        self.labels = {cfg.labels.get(n, n): n for n in names}
        self.labels.setdefault("other", None)
        self.label_ids = [self.tok(" " + lab, add_special_tokens=False)["input_ids"] for lab in self.labels]
        examples = "".join(f"Request: {t}\nCategory: {cfg.labels.get(lab, lab)}\n" for t, lab in cfg.examples)
        self.template = cfg.classification_prompt.replace("{labels}", ", ".join(self.labels)).replace(
            "{examples}", examples)
        self.prior = self._scores(self.CONTENT_FREE) if cfg.calibrate else torch.zeros(len(self.labels))

    def _scores(self, request: str):
        """Summed log-probs of each label's tokens after the prompt, one batched forward."""
        import torch

        prompt_ids = self.tok(self.template.replace("{request}", request))["input_ids"]
        seqs = [prompt_ids + ids for ids in self.label_ids]
        width = max(map(len, seqs))
        pad = self.tok.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        out = []
        for k, lab in enumerate(self.label_ids):
            start = len(prompt_ids)
            out.append(sum(logp[k, start + j - 1, t].item() for j, t in enumerate(lab)))
        return torch.tensor(out)

    def route(self, text):
        import torch

        scores = self._scores(text) - self.prior
        probs = torch.softmax(scores, -1)
        i = int(scores.argmax())
        label = list(self.labels)[i]
        detail = {"label": label, "confidence": round(float(probs[i]), 4)}
        name = self.labels[label]
        if name is None or float(probs[i]) < self.cfg.min_confidence:
            return None, detail
        return name, detail


def build_strategy(cfg, names: list[str]) -> Strategy:
    """The configured strategy (`cfg` is a ServeConfig)."""
    r = cfg.router
    if r.strategy == "explicit":
        return Explicit()
    if r.strategy == "keywords":
        return Keywords(r.keywords)
    if r.strategy == "cem":
        return Cem(r.cem_expert)
    if r.strategy == "classifier":
        from raylib.serve.classifier import ensure_classifier

        return ClassifierStrategy(ensure_classifier(r.classifier, r.classifier_data, r.classifier_label_field),
                                  names, r.min_confidence)
    return PromptClassifier(cfg.base_model, names, r, cfg.dtype)
