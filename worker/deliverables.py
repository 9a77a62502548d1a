"""What a screened image leaves besides its row: messages, the heatmap SC, re-sent objects.

The batch pipeline (worker/pipeline.py) builds an SR (and an SC) per image; here are the HL7 /
FHIR messages that report the SR, the heatmap Secondary Capture, and, for a re-screened image,
the deliveries that send its stored objects again unchanged when they came from the same model
version (result UIDs are deterministic, worker/results/common.py).
"""

from __future__ import annotations

import logging
import re
import time

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from worker import heatmap, imaging, overlay, results, store
from worker.engine import Engine
from worker.settings import Destination, Settings
from worker.spool import Spool

__all__ = ["heatmap_sc", "message_relpath", "messages", "same_version_result"]

log = logging.getLogger(__name__)


def messages(
    source: Dataset, result: results.TriageResult, sr: Dataset, destinations: list[Destination], spool: Spool
) -> list[store.NewDelivery]:
    """One message per HL7 / FHIR destination, written to the spool beside the SR it reports.

    The delivery row names the SR's UID (deterministic, so a re-screen replaces the message) and
    the message file; the sender transmits the file as it is, so every retry sends the same bytes.
    """
    out: list[store.NewDelivery] = []
    sr_uid = str(sr.SOPInstanceUID)
    for d in destinations:
        rel = message_relpath(sr_uid, d)
        if d.type == "hl7":
            from worker import hl7

            data = hl7.build_oru(source, result, d, sr_uid).encode("utf-8")
        else:
            from worker import fhir

            data = fhir.build_bundle(source, result, sr_uid)
        spool.write(rel, data)
        out.append(store.NewDelivery(d.name, d.type, str(sr.SOPClassUID), sr_uid, rel))
    return out

def message_relpath(sr_uid: str, dest: Destination) -> str:
    """Spool path of the HL7 / FHIR message that reports the SR ``sr_uid`` to ``dest``."""
    stem = Spool.result_relpath_for(sr_uid).removesuffix(".dcm")
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", dest.name)
    return f"{stem}.{safe}.{'hl7' if dest.type == 'hl7' else 'json'}"

def heatmap_sc(
    engine: Engine, ds: Dataset, result: results.TriageResult, maps: list[np.ndarray], spec: imaging.PreprocessSpec,
    timing: dict[str, float],
) -> Dataset | None:
    """The heatmap Secondary Capture of one image (worker/heatmap.py, worker/overlay.py), or None
    with a log line when it cannot be made: a heatmap is an aid, it never costs the image its triage."""
    t = time.perf_counter()
    try:
        assert engine.heatmap is not None
        shown = heatmap.cam_classes(result.probabilities, result.thresholds, engine.card.classes)
        cams = heatmap.gradcam(engine.heatmap, maps, [engine.card.classes.index(c) for c in shown], spec.size)
        timing["heatmap_ms"] = (time.perf_counter() - t) * 1e3
        return overlay.build_heatmap_sc(ds, result, dict(zip(shown, cams, strict=True)), crop=spec.crop)
    except Exception as exc:  # noqa: BLE001 - logged; the SR (and banner SC) still go out
        log.warning("heatmap of %s not made (%s: %s); its SR is sent without one",
                    ds.get("SOPInstanceUID", "?"), type(exc).__name__, exc)
        return None

def same_version_result(
    job: store.Claimed, ds: Dataset, prev: store.PreviousResult | None, card: object, spool: Spool, settings: Settings,
    with_heatmaps: bool = False,
) -> tuple[store.PreviousResult, list[store.NewDelivery]] | None:
    """The deliveries that re-send this job's stored result objects unchanged, when its previous
    result came from the model screening now (name and version) and every object this node sends
    (SR, and SC when enabled) is still in the spool; else None (screen and build anew).

    Result UIDs depend on the source and the model version only (results.result_uids), so a new
    version makes new objects and this one re-sends the objects the PACS already has.
    """
    name, version = getattr(card, "name", None), getattr(card, "version", None)
    if prev is None or (prev.model_name, prev.model_version) != (name, version):
        return None
    study = str(ds.get("StudyInstanceUID", "") or "")
    if not study:
        return None
    uids = results.result_uids(job.sop_instance_uid, study, str(name), str(version))
    kinds = [("sr", str(uids.sr_instance))]
    if settings.send.secondary_capture:
        kinds.append(("sc", str(uids.sc_instance)))
    if with_heatmaps:
        kinds.append(("heatmap", str(overlay.heatmap_uids(job.sop_instance_uid, study, str(name), str(version))[1])))
    items: list[store.NewDelivery] = []
    for kind, uid in kinds:
        rel = Spool.result_relpath_for(uid)
        try:
            stored = dcmread(spool.path(rel), stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        except (OSError, ValueError, InvalidDicomError, EOFError, KeyError):
            return None  # gone (purged) or unreadable: build anew
        if str(stored.get("SOPInstanceUID", "")) != uid:
            return None
        items += [store.NewDelivery(d.name, kind, str(stored.SOPClassUID), uid, rel)
                  for d in settings.result_destinations if not d.message_based]
        if kind == "sr":
            for d in (d for d in settings.result_destinations if d.message_based):
                msg = message_relpath(uid, d)
                if not spool.path(msg).is_file():
                    return None  # the HL7 / FHIR message was not kept: build anew
                items.append(store.NewDelivery(d.name, d.type, str(stored.SOPClassUID), uid, msg))
    return prev, items
