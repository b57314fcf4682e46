"""SecAgg+ at a site: one train handler answers plain and SecAgg+ rounds alike.

The coordinator's side is fedgen.server.secagg. SecAgg+ exists only in Flower's legacy API:
``secaggplus_mod`` wraps a train handler that speaks the legacy ``fitins.*`` / ``fitres.*``
records, and masks the reply's arrays before they leave the site.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedgen.protocol import (
    ARRAY_KEYS,
    LEGACY_CONFIG,
    LEGACY_PARAMS,
    RELEASED_KEY,
    SITE_KEY,
    TRAIN_ARRAYS,
    TRAIN_CONFIG,
    TRAIN_METRICS,
    TRAIN_SITE,
)

__all__ = ["secagg_mod", "train_inputs", "train_reply"]


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """secaggplus_mod for the server's SecAgg+ rounds; plain rounds go straight to the handler."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _is_secagg(content: RecordDict) -> bool:
    return LEGACY_PARAMS in content.array_records


def train_inputs(content: RecordDict) -> tuple[dict[str, torch.Tensor], ConfigRecord]:
    """The global state and the round's settings, from a plain or a SecAgg+ train message."""
    if not _is_secagg(content):
        return content[TRAIN_ARRAYS].to_torch_state_dict(), content[TRAIN_CONFIG]
    settings = content[LEGACY_CONFIG]
    ndarrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(content[LEGACY_PARAMS], keep_input=True))
    state = {k: torch.from_numpy(np.array(a)) for k, a in zip(settings[ARRAY_KEYS], ndarrays, strict=True)}
    return state, settings


def train_reply(
    content: RecordDict, state: dict[str, torch.Tensor], metrics: dict[str, float], site: str, *, released: str
) -> RecordDict:
    """The reply to a train message in the format it came in (secaggplus_mod masks the arrays).

    ``released`` lists every update the site released in the run (fedgen.protocol.RELEASED_KEY).
    """
    if not _is_secagg(content):
        return RecordDict(
            {
                TRAIN_ARRAYS: ArrayRecord(torch_state_dict=state),
                TRAIN_METRICS: MetricRecord(metrics),
                TRAIN_SITE: ConfigRecord({"name": site, RELEASED_KEY: released}),
            }
        )
    keys = content[LEGACY_CONFIG][ARRAY_KEYS]
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([state[k].detach().cpu().numpy() for k in keys]),
        num_examples=int(metrics["num-examples"]),
        metrics={**metrics, SITE_KEY: site, RELEASED_KEY: released},
    )
    return compat.fitres_to_recorddict(fitres, keep_input=False)
