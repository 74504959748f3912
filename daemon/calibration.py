"""A model's int8/uint8 ranges (daemon.typed_vectors): its unit vectors over a fixed text set, once.

Calibrated when a model is created or pulled (setting `calibrate_on_store`), or else at its first
int8/uint8 request, and kept in its manifest: every request and every daemon of a fleet quantises a
text the same way, whatever else the request holds. The text set is built in and never changes
(changing it would change every model's integers); each text is decoded alone, one decode per
text, so no batch neighbour can move a value, and the ranges are rounded outward to a 1e-4 grid, so
the last-bit differences between CPUs rarely move a boundary.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import numpy as np

from daemon.errors import EmberdError
from daemon.memory import input_tokens_bound
from daemon.scheduler import Scheduler
from daemon.store import ModelStore, StoredModel
from daemon.typed_vectors import QuantizationRanges
from daemon.vectors import check_finite, normalize_rows

log = logging.getLogger(__name__)

GRID: Final = 1e-4
# Queries and passages of many kinds, lengths and languages: the ranges should hold what users send.
CALIBRATION_TEXTS: Final = (
    "how do I reset my router password",
    "What is the capital of Australia?",
    "best hiking trails near the coast",
    "symptoms of vitamin D deficiency",
    "python list comprehension with condition",
    "cheap flights from Lisbon to Oslo in March",
    "why is the sky blue",
    "recipe for a vegetarian lasagna without ricotta",
    "The mitochondrion is the organelle where most of a cell's ATP is produced by oxidative phosphorylation.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War and reshaped the map of Europe.",
    "A binary search halves the interval at every step, so it finds an item in logarithmic time.",
    "Interest rates rose for the fourth consecutive quarter as the central bank fought inflation.",
    "The defendant's appeal was dismissed because the notice was filed after the statutory deadline.",
    "Preheat the oven to 200 degrees, then roast the vegetables for forty minutes, turning them once.",
    "The patient presented with a persistent dry cough, mild fever and fatigue lasting two weeks.",
    "Our quarterly revenue grew 12% year over year, driven mostly by subscriptions in Asia.",
    "The new firmware fixes a race condition that could corrupt the write cache after a power loss.",
    "She walked along the empty beach at dawn, listening to the gulls and the slow waves.",
    "Black holes form when massive stars collapse under their own gravity at the end of their lives.",
    "To install the package, run the installer as an administrator and restart the computer.",
    "The striker scored twice in the second half, and the home side won the final three to one.",
    "Customer reports that the invoice total does not match the sum of the line items.",
    "Error: connection refused while connecting to the database on port 5432.",
    "def add(a, b):\n    return a + b",
    "SELECT name, count(*) FROM orders GROUP BY name HAVING count(*) > 10;",
    "for (int i = 0; i < n; ++i) { total += values[i]; }",
    '{"id": 42, "status": "shipped", "items": [1, 2, 3]}',
    "3.14159 2.71828 1.41421 1.61803",
    "Order #55213 shipped on 2024-05-17 via express courier, tracking 1Z999AA10123456784.",
    "Terms and conditions apply. Offer valid while stocks last.",
    "Thank you for your message! We will get back to you within two business days.",
    "The quick brown fox jumps over the lazy dog.",
    "climate change effects on coral reefs",
    "machine learning model overfitting remedies",
    "Who wrote Pride and Prejudice?",
    "Wie spät ist es in Tokio?",
    "Die Bahn hat wegen eines Stellwerksausfalls zwischen Köln und Düsseldorf Verspätung.",
    "Quelle est la meilleure saison pour visiter la Provence ?",
    "Le gouvernement a présenté un projet de loi sur la rénovation énergétique des logements.",
    "¿Cómo se prepara una paella valenciana tradicional?",
    "El museo abrirá una nueva sala dedicada a la pintura española del siglo XIX.",
    "Qual è la differenza tra un vulcano attivo e uno dormiente?",
    "De gemeente gaat meer fietsenstallingen bouwen bij het centraal station.",
    "Como faço para renovar o meu passaporte?",
    "Как приготовить борщ без мяса?",
    "Учёные обнаружили новый вид лягушек в тропических лесах Амазонии.",
    "如何学习中文语法？",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "東京で一番おいしいラーメン屋はどこですか。",
    "明日の会議は午後三時に延期されました。",
    "서울에서 부산까지 기차로 얼마나 걸리나요?",
    "ما هي عاصمة المغرب؟",
    "يعتبر النيل أطول نهر في العالم ويمر عبر عدة دول أفريقية.",
    "भारत की राजधानी नई दिल्ली है।",
    "Ελπίζω να έχετε μια υπέροχη μέρα.",
    "Bugün hava çok güzel, parka gidelim mi?",
    "Hôm nay trời mưa rất to ở Hà Nội.",
    "a",
    "OK",
    "?!",
    "2024",
    "The committee reviewed the proposal in detail and, after a long discussion about costs, risks and "
    "the schedule, agreed to fund a smaller pilot first and to decide on the full programme next year.",
    "In distributed systems, consensus protocols such as Raft and Paxos let a group of machines agree on "
    "a sequence of values even when some of them fail or messages are delayed or lost.",
)


def ranges_of(vectors: np.ndarray) -> QuantizationRanges:
    """Per dimension, the lowest and highest value of the rows made unit-length, rounded outward to
    the grid."""
    check_finite(vectors)
    unit = normalize_rows(vectors).astype(np.float64)
    # In grid steps, first rounded to a hundredth of a step (1e-6, float32's precision here), so a
    # value on the grid but for float32's last bit (0.6 is 0.60000002) stays on it.
    low = np.floor(np.round(unit.min(axis=0) / GRID, 2)) * GRID
    high = np.ceil(np.round(unit.max(axis=0) / GRID, 2)) * GRID
    return QuantizationRanges(low.astype(np.float32), high.astype(np.float32))


class Calibrator:
    """Calibrates each model once (concurrent asks for one model share the work) and records the
    ranges in its manifest."""

    def __init__(self, store: ModelStore, scheduler: Scheduler) -> None:
        self._store = store
        self._scheduler = scheduler
        self._running: dict[str, asyncio.Lock] = {}

    async def ranges(self, model: StoredModel) -> QuantizationRanges:
        """The model's ranges: those its manifest holds, or calibrated now."""
        if model.quantization_ranges is not None:
            return model.quantization_ranges
        lock = self._running.setdefault(model.digest, asyncio.Lock())
        async with lock:
            current = await asyncio.to_thread(self._store.get, model.name)
            if current.digest == model.digest and current.quantization_ranges is not None:
                return current.quantization_ranges  # another request calibrated it meanwhile
            ranges = await self._calibrate(model)
            await asyncio.to_thread(self._store.record_quantization_ranges, model.name, model.digest, ranges)
            return ranges

    async def after_store(self, name: str) -> None:
        """Calibrate a model just created or pulled. A model that cannot be loaded, or a reranker,
        is left uncalibrated: the create or pull has succeeded, and a later int8 request says why."""
        model = await asyncio.to_thread(self._store.get, name)
        if model.facts.is_reranker or model.quantization_ranges is not None:
            return
        try:
            await self.ranges(model)
        except EmberdError as error:
            log.warning("%s: int8/uint8 ranges not calibrated: %s", model.name, error.message)

    async def _calibrate(self, model: StoredModel) -> QuantizationRanges:
        longest = max(input_tokens_bound((text,)) for text in CALIBRATION_TEXTS)
        rows = []
        async with self._scheduler.lease(model, {}, None, longest) as lease:
            runner = lease.loaded.runner
            for text in CALIBRATION_TEXTS:  # one decode each: no neighbour in the batch
                result = await runner.embed([text], True, lease.limit_tokens)
                rows.append(result.vectors[0])
        ranges = ranges_of(np.stack(rows))
        log.info("%s: int8/uint8 ranges calibrated on %d texts", model.name, len(CALIBRATION_TEXTS))
        return ranges
