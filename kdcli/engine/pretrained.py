"""Pretrained teachers by name: ``torchvision:<model>.<WEIGHTS>`` (``torchvision:resnet34.IMAGENET1K_V1``) or
``timm:<model>.<tag>`` (``timm:resnet34.a1_in1k``).

The weights come from the local caches the two libraries keep (torch hub's ``checkpoints/`` for torchvision,
the Hugging Face hub cache for timm) and are downloaded into them when the machine is online. Offline and
absent, loading stops with one line naming the file and where to put it, or to pass the downloaded file as
``teacher.checkpoint``: the name then gives the architecture and the normalisation, the file the weights (and
the class count: a teacher of the named network fine-tuned, or trained by kdcli, on another dataset).

The returned network carries ``kdcli_meta`` with the class count and the normalisation its weights were
trained with (mean, std), which the engine compares with the data's to re-normalise the teacher's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from kdcli.engine.checkpoint import infer_num_classes, read_state_dict
from kdcli.errors import UserError

SOURCES = ("torchvision", "timm")


@dataclass(frozen=True)
class PretrainedName:
    source: Literal["torchvision", "timm"]
    model: str
    weights: str

    @property
    def text(self) -> str:
        return f"{self.source}:{self.model}.{self.weights}"


def parse_pretrained(text: str) -> PretrainedName:
    """``source:model.weights`` -> its parts; :class:`UserError` naming the expected spelling otherwise."""
    source, _, rest = text.partition(":")
    model, _, weights = rest.partition(".")
    if source not in SOURCES or not model or not weights:
        raise UserError(f"teacher.pretrained '{text}': expected torchvision:<model>.<WEIGHTS> (e.g. "
                        "torchvision:resnet34.IMAGENET1K_V1) or timm:<model>.<tag> (e.g. timm:resnet34.a1_in1k)")
    return PretrainedName(source, model, weights)  # type: ignore[arg-type]


def load_pretrained(text: str, num_classes: int, checkpoint: str | None = None) -> nn.Module:
    """The named pretrained network in eval mode, its weights from the cache (or ``checkpoint``), with ``kdcli_meta``."""
    name = parse_pretrained(text)
    network, mean, std = (_torchvision if name.source == "torchvision" else _timm)(name, checkpoint)
    classes = network.num_classes if hasattr(network, "num_classes") else _out_features(network)
    if classes != num_classes:
        raise UserError(f"teacher.pretrained {text} predicts {classes} classes but the data has {num_classes}; use a "
                        "teacher trained on this dataset")
    network.kdcli_meta = {"num_classes": classes, "mean": list(mean), "std": list(std), "pretrained": text}
    network.kdcli_arch = name.model
    return network.eval()


def _out_features(network: nn.Module) -> int:
    return [m for m in network.modules() if isinstance(m, nn.Linear)][-1].out_features


def _torchvision(name: PretrainedName, checkpoint: str | None) -> tuple[nn.Module, tuple, tuple]:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name.model)[name.weights]
    except (ValueError, KeyError):
        raise UserError(f"teacher.pretrained {name.text}: torchvision has no weights '{name.weights}' for "
                        f"'{name.model}'; see torchvision.models.get_model_weights('{name.model}')") from None
    transform = weights.transforms()
    state = _read(checkpoint) if checkpoint is not None else None
    classes = len(weights.meta["categories"]) if state is None else infer_num_classes(state)
    network = torchvision.models.get_model(name.model, weights=None, num_classes=classes)
    if state is None:
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # noqa: BLE001 - offline, refused or damaged: one line saying what to place where
            file = weights.url.rsplit("/", 1)[-1]
            where = Path(torch.hub.get_dir()) / "checkpoints"
            raise UserError(f"teacher.pretrained {name.text}: its weights are not in the local cache and could not be "
                            f"downloaded ({type(err).__name__}); place {file} (from {weights.url}) in {where}, or pass "
                            "the file as teacher.checkpoint") from None
    _load(network, state, name.text)
    return network, tuple(transform.mean), tuple(transform.std)


def _timm(name: PretrainedName, checkpoint: str | None) -> tuple[nn.Module, tuple, tuple]:
    import timm

    full = f"{name.model}.{name.weights}"
    if not timm.is_model(name.model):
        raise UserError(f"teacher.pretrained {name.text}: timm has no model '{name.model}'")
    state = _read(checkpoint) if checkpoint is not None else None
    try:
        network = timm.create_model(full, pretrained=state is None,
                                    **({} if state is None else {"num_classes": infer_num_classes(state)}))
    except RuntimeError as err:
        if "Unknown pretrained tag" in str(err) or "Invalid pretrained tag" in str(err):
            raise UserError(f"teacher.pretrained {name.text}: timm has no weights '{name.weights}' for "
                            f"'{name.model}'; see timm.list_pretrained('{name.model}.*')") from None
        raise _offline(name, err) from None
    except Exception as err:  # noqa: BLE001 - offline, refused or damaged: one line saying what to place where
        raise _offline(name, err) from None
    if state is not None:
        _load(network, state, name.text)
    cfg = network.pretrained_cfg
    return network, tuple(cfg["mean"]), tuple(cfg["std"])


def _offline(name: PretrainedName, err: Exception) -> UserError:
    import timm

    cfg = timm.models.get_pretrained_cfg(f"{name.model}.{name.weights}")
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = f"https://huggingface.co/{hub}/resolve/main/model.safetensors" if hub else getattr(cfg, "url", "")
    return UserError(f"teacher.pretrained {name.text}: its weights are not in the Hugging Face cache and could not "
                     f"be downloaded ({type(err).__name__}); download {url} and pass the file as teacher.checkpoint "
                     "(or place it in the Hugging Face cache, $HF_HOME/hub, while online once)")


def _read(checkpoint: str) -> dict[str, torch.Tensor]:
    return read_state_dict(checkpoint)[0]


def _load(network: nn.Module, state: dict[str, torch.Tensor], text: str) -> None:
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:200]
        raise UserError(f"the weights given for teacher.pretrained {text} do not fit that network: {detail}") from None
