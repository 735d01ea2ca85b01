"""Secure aggregation on the server: one training round under Flower's SecAgg+ (``SecAggPlusWorkflow``).

Flower 1.41 has SecAgg+ only in its legacy workflow API: the workflow takes a ``LegacyContext`` holding a
legacy strategy, asks it for ``FitIns`` and hands it the unmasked *sum* in ``aggregate_fit``. Here a one-round
adapter plays that strategy: it sends the round's global model and train config to the sites the FedAvg
strategy sampled, and keeps the sum the protocol reveals, which (sites sending their update with weight 1 or
0, ``client.secure``) is the mean update of the sites that trained. The server never holds one site's update;
what it still sees of each site is the clear metrics of the reply (ε, whether it declined) and who answered.

What this protects against: a server that follows the protocol but looks at what it receives (it learns the
sum only), and up to a threshold of colluding sites. What it does not: a server that lies in the protocol
(Flower's SecAgg+ has no consistency round, so it could declare a live site dropped to some neighbours to
collect both of its secrets), or a site that poisons the sum — the server can no longer check one update, so
under SecAgg+ a bad update is caught only if it makes the sum non-finite. The sites' DP is what bounds what
any model reveals either way."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

PROTOCOL = "SecAgg+ (Flower 1.41: flwr.server.workflow.SecAggPlusWorkflow, flwr.client.mod.secaggplus_mod)"
CLIPPING_RANGE = 8.0  # Flower's defaults: an update coordinate is clipped to ±8 and quantized to 2^22 levels
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32  # the sum of at most 2^32 / 2^22 = 1024 sites' weights fits


@dataclass
class SecureRound:
    """What one SecAgg+ round gave the server: the replies that carried a masked update (with their clear
    metrics; their array records are empty), the mean update of the sites that trained (None when the protocol
    halted or no site sent one), and how the protocol ran."""

    replies: list[Message] = field(default_factory=list)
    mean_update: list[np.ndarray] | None = None
    shares: int = 0
    threshold: int = 0
    completed: bool = False
    failed: dict[int, str] = field(default_factory=dict)  # node → why it left the protocol (an error reply)
    restarted_without: list[int] = field(default_factory=list)  # nodes lost before training: restarted without


class _Proxy:  # the legacy ClientProxy the workflow keys its results by: only the node id is used
    def __init__(self, node_id: int):
        self.node_id = node_id


class _Nodes:  # the legacy ClientManager: the workflow only logs how many are available
    def __init__(self, n: int):
        self.n = n

    def num_available(self) -> int:
        return self.n


class _OneRound:
    """The legacy strategy SecAggPlusWorkflow drives for one round."""

    def __init__(self, nodes: list[int], fitins: FitIns):
        self.nodes, self.fitins, self.mean = nodes, fitins, None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(n), FitIns(self.fitins.parameters, dict(self.fitins.config))) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        if results:  # every result carries the same unmasked aggregate
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


class _RecordingGrid:
    """The round's grid, keeping the replies of the masked-vector stage (the only stage that runs ``train``),
    which nodes answered each stage, and the error of each node that failed one. It sends no masked-vector
    stage once a sampled node is lost: Flower 1.41 could not unmask that round (it asks the others for shares
    of the lost node's key, which they never received), and the sites would have trained for nothing."""

    def __init__(self, grid, nodes: list[int]):
        self.grid, self.nodes, self.collected, self.answered, self.failed = grid, set(nodes), [], {}, {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stage = messages[0].content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) if messages else None
        if stage == Stage.COLLECT_MASKED_VECTORS and not all(self.nodes <= a for a in self.answered.values()):
            return []  # the workflow halts ("insufficient available nodes"); secure_round starts again
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if stage == Stage.COLLECT_MASKED_VECTORS:
            self.collected = replies
        self.answered[stage] = {int(r.metadata.src_node_id) for r in replies if not r.has_error()}
        for r in replies:
            if r.has_error():
                self.failed[int(r.metadata.src_node_id)] = f"SecAgg+ {stage}: {r.error.reason}"
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def secure_round(
    grid, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord, server_round: int, threshold: float, timeout
) -> SecureRound:
    """Run SecAgg+ over ``nodes`` for one training round of ``arrays`` (the global model) with ``config``.

    Flower's protocol cannot finish once a node is lost before its key shares went out (the others are asked
    for shares of its key that they never received): such a round is stopped before its masked-vector stage
    (:class:`_RecordingGrid`) and starts again with the nodes that answered every stage so far, once, when at
    least two did. Nobody has trained yet (``train`` runs in the masked-vector stage), so nothing is spent
    twice."""
    result = _secure_round(grid, nodes, arrays, config, server_round, threshold, timeout)
    lost = [n for n in nodes if n in result.round.failed or n not in result.answered]
    survivors = [n for n in nodes if n not in lost]
    if result.round.completed or Stage.COLLECT_MASKED_VECTORS in result.stages or not lost or len(survivors) < 2:
        return result.round
    again = _secure_round(grid, survivors, arrays, config, server_round, threshold, timeout)
    again.round.failed = {**result.round.failed, **again.round.failed}
    again.round.restarted_without = lost
    return again.round


@dataclass
class _Attempt:
    round: SecureRound
    answered: set[int]  # nodes that answered every stage that ran
    stages: set[str]


def _secure_round(grid, nodes, arrays, config, server_round, threshold, timeout) -> _Attempt:
    fitins = FitIns(ndarrays_to_parameters([a.numpy() for a in arrays.values()]), dict(config))
    strategy = _OneRound(nodes, fitins)
    legacy = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
        client_manager=_Nodes(len(nodes)),
    )
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(fitins.parameters, True)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled site holds a share of every other's secrets
        reconstruction_threshold=threshold,
        max_weight=1.0,
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    recording = _RecordingGrid(grid, nodes)
    with np.errstate(divide="ignore", invalid="ignore"):  # no site trained: a sum of weight 0 (the caller keeps
        workflow(recording, legacy)  # the model)
    shares = len(nodes)
    answered = set(nodes).intersection(*recording.answered.values()) if recording.answered else set()
    done = SecureRound(
        replies=recording.collected,
        mean_update=strategy.mean,
        shares=shares,
        threshold=max(round(threshold * shares), 2),
        completed=strategy.mean is not None,
        failed=dict(recording.failed),
    )
    return _Attempt(done, answered, set(recording.answered))
