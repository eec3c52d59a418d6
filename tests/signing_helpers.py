"""Devices that trust a test's own model-signing key, and models sealed with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from clients.device import Device
from fedge.contracts.config import FedgeConfig
from fedge.contracts.signing import PUBLIC_KEY_FILE, ModelSigner, server_signer


def trusting(cfg: FedgeConfig, folder: Path) -> tuple[FedgeConfig, ModelSigner]:
    """``cfg`` whose devices trust a key made in ``folder/signing``, and that key's signer."""
    keys = folder / "signing"
    signer = server_signer(keys)
    run = dataclasses.replace(cfg.run, model_public_key=str(keys / PUBLIC_KEY_FILE))
    return dataclasses.replace(cfg, run=run), signer


def deploy_signed(
    device: Device,
    signer: ModelSigner,
    version: int,
    weights: dict[str, np.ndarray],
    family: int | None = None,
) -> bool:
    """Install ``weights`` on ``device`` as the server would send them: sealed."""
    return device.deploy(version, weights, family, signer.seal(version, weights))
