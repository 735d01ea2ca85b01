"""Simulated sites of realistic size (run config site-frames): frames generated when a row is read, in closed
form, never held in memory; the same rows for training, evaluation and the final compression."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from common.config.fedconfig import RunConfig
from common.data.clips import streamed_site_frame
from common.data.sites import StreamedSite


def test_a_streamed_site_is_deterministic_distinct_and_moving():
    a, b = StreamedSite(103, 500, 96, 64, 48), StreamedSite(103, 500, 96, 64, 48)
    assert len(a) == 500 and np.array_equal(a[123], b[123]) and a[123].shape == (64, 96, 3)
    assert not np.array_equal(a[123], StreamedSite(104, 500, 96, 64, 48)[123])  # another site, another scene
    step = np.abs(a[10].astype(int) - a[11]).mean()
    assert 0.5 < step < 20  # consecutive frames: the same scene, things moving, fresh sensor noise
    assert np.abs(a[10].astype(int) - a[60]).mean() > step  # another clip (clips of 48 frames)


def test_segments_are_consecutive_frames_of_one_clip_and_views_slice_lazily():
    frames, segments = StreamedSite(101, 100, 64, 48, 20), StreamedSite(101, 100, 64, 48, 20, unit=4)
    assert len(segments) == 25  # 5 clips of 20 frames, 5 segments each
    seg = segments[6]  # clip 1, frames 4..7
    assert all(np.array_equal(f, frames[24 + j]) for j, f in enumerate(seg))
    head, tail = frames[:-3], frames[-3:]
    assert isinstance(head, StreamedSite) and len(head) == 97 and len(tail) == 3
    assert np.array_equal(tail[2], frames[99]) and np.array_equal(list(tail)[0], frames[97])


def test_a_site_of_twenty_thousand_frames_costs_a_few_megabytes():
    tracemalloc.start()
    try:
        site = StreamedSite(102, 20_000, 160, 120, 96)
        rng = np.random.default_rng(0)
        for i in rng.integers(0, len(site), 200):
            site[int(i)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    held = 20_000 * 160 * 120 * 3
    assert peak < 20e6 < held  # 1.15 GB if held; a few clips' backgrounds here


def test_a_federated_round_on_a_streamed_site(monkeypatch, tmp_path):
    """A site of 2,000 frames: q and units count them all, the held-out frames are the streamed site's last ones,
    and the final compression streams its first clips."""
    from client.policy import SitePolicy
    from client.site import load_site, site_clips

    rc = RunConfig.from_mapping({"site-frames": 2000, "demo-frames": 50, "demo-width": 64, "demo-height": 48})
    node = {"partition-id": 1, "num-partitions": 2}
    site = load_site(node, rc, SitePolicy.of(node), 1)
    assert len(site.train_rows) == 2000 - rc.eval_frames and len(site.held_out) == rc.eval_frames
    assert np.array_equal(site.held_out[-1], streamed_site_frame(101, 39, 49, 64, 48, 50))
    clips = list(site_clips(node, rc, 1))
    assert [c[0] for c in clips] == ["clip_0", "clip_1"]
    first = list(clips[0][1]())
    assert len(first) == 50 and np.array_equal(first[7], site.train_rows[7])


@pytest.mark.parametrize("unit", ["frame", "segment"])
def test_a_dp_round_on_a_streamed_site_accounts_every_row(unit):
    import json

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client import app as client_app
    from common.net.architecture import CodecConfig
    from common.net.model import FedlvcCodec

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    torch.manual_seed(0)
    model = FedlvcCodec(CodecConfig(channels=8, latent_channels=8, mixtures=2))
    run = {"site-frames": 2000, "demo-frames": 40, "demo-width": 64, "demo-height": 48, "local-steps": 2,
           "batch-size": 8, "crop-size": 32, "privacy-unit": unit}  # fmt: skip
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config=run)  # fmt: skip
    config = ConfigRecord({"model-config": json.dumps(model.cfg.to_dict()), "server-round": 1})
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}), dst_node_id=1,
                  message_type="train")  # fmt: skip
    m = client_app.train(msg, ctx).content["metrics"]
    rows = (2000 - 4) if unit == "frame" else 2000 // 4 - 1
    assert m["declined"] == 0 and m["units"] == rows
    assert m["sample_rate"] == pytest.approx(1 / -(-rows // 8))


def test_a_photo_site_films_only_held_out_photographs(corpus, tmp_path):
    """demo-photos: simulated sites film the corpus' held-out photographs (never the pre-training ones),
    deterministic per site, moving and noisy, generated on demand."""
    from client.policy import SitePolicy
    from client.site import load_site, site_clips
    from common.data.photovideo import corpus_photos
    from common.data.sites import simulated_site

    rc = RunConfig.from_mapping(
        {"demo-photos": str(corpus), "site-frames": 400, "demo-frames": 40, "demo-width": 64, "demo-height": 48}
    )
    site = simulated_site(101, rc)
    assert site.photos == tuple(corpus_photos(corpus, held_out=True)) and len(site) == 400
    assert not set(site.photos) & set(corpus_photos(corpus))  # no pre-training photograph
    a = site[17]
    assert a.shape == (48, 64, 3) and np.array_equal(a, simulated_site(101, rc)[17])
    assert np.abs(a.astype(int) - site[18]).mean() > 0.3  # a moment later: sensor noise at least
    node = {"partition-id": 1, "num-partitions": 2}
    held = load_site(node, rc, SitePolicy.of(node), 1).held_out
    assert np.array_equal(held[-1], site[399])
    first = list(next(iter(site_clips(node, rc, 1)))[1]())
    assert len(first) == 40 and np.array_equal(first[3], site[3])
