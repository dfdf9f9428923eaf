"""``reglm serve`` as a user meets it: the real server started on 127.0.0.1 and a free port in a
child process, and a real HTTP client (httpx). Its numbers against ``lm.score``/``full_scores``/
``next_words`` computed here; every refused request's status and error; a bounded load test; the
drain on SIGTERM. The batcher alone is tested in-process."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import reglm  # noqa: E402
from reglm.api import TrainedModel  # noqa: E402
from reglm.cli import main  # noqa: E402
from reglm.config import build_config  # noqa: E402
from reglm.modeldir import save_model_dir  # noqa: E402
from reglm.serve.batching import Batcher  # noqa: E402
from tests.test_scoring import _model  # noqa: E402

LIMITS = ["--max-sentences", "20", "--max-words", "30", "--max-body-bytes", "4096", "--max-k", "50"]
POOL = [
    "w1 w2 w3",
    "",
    "w7",
    "w4 w4 w9 w12 w30 w2 w2 w5",
    "w3 zebra w1",
    "w10 w11 w12 w13 w14 w15",
    "w8 w8",
    "w20 w21 w22 w23",
]
TOLERANCE = 1e-5
"""Server and test score the same sentences in batches of other compositions and paddings; the
float32 kernels then round differently (about 1e-7 relative on these few-nats scores)."""


class Server:
    """A ``reglm serve`` child process and its base URL."""

    def __init__(self, model: Path, log: Path, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(reglm.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
        self.log = log
        self.stderr = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reglm", "serve", str(model), "--port", "0", *extra],
            stderr=self.stderr,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 120
        while "serving" not in log.read_text():
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start within 120 s"
            time.sleep(0.1)
        self.url = log.read_text().split(" on ", 1)[1].split()[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.stderr.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainedModel]:
    lm = _model("awd-lstm")
    directory = tmp_path_factory.mktemp("serve") / "model"
    save_model_dir(directory, lm.model, build_config("tiny"), lm.vocab)
    return directory, reglm.load(directory)


@pytest.fixture(scope="module")
def server(model: tuple[Path, TrainedModel], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(model[0], tmp_path_factory.mktemp("log") / "server.log", *LIMITS, "--max-wait-ms", "5")
    yield running
    assert running.stop() == 0


def test_scores_and_next_words_are_the_librarys(server: Server, model: tuple[Path, TrainedModel]) -> None:
    lm = model[1]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.post("/score", json={"sentences": POOL, "words": True})
        assert reply.status_code == 200
        results = reply.json()["results"]
        assert [r["id"] for r in results] == [str(i) for i in range(1, len(POOL) + 1)]
        assert [r["log_prob"] for r in results] == pytest.approx(lm.score_batch(POOL), abs=TOLERANCE)
        for result, words in zip(results, lm.full_scores_batch(POOL)):
            assert [(w["word"], w["oov"]) for w in result["words"]] == [(w.word, w.oov) for w in words]
            assert [w["log_prob"] for w in result["words"]] == pytest.approx([w.log_prob for w in words], abs=TOLERANCE)
            assert result["tokens"] == len(words) and result["oov"] == sum(w.oov for w in words)
        nbest = client.post(
            "/score", json={"sentences": POOL[:3], "ids": ["a", "b", "c"], "base": "10", "eos": False}
        ).json()
        assert nbest["base"] == "10" and [r["id"] for r in nbest["results"]] == ["a", "b", "c"]
        assert [r["log_prob"] for r in nbest["results"]] == pytest.approx(
            lm.score_batch(POOL[:3], base=10, eos=False), abs=TOLERANCE
        )
        assert nbest["results"][1]["tokens"] == 0 and nbest["results"][1]["ppl"] is None, (
            "an empty sentence without <eos>"
        )
        proposed = client.post("/next", json={"prefix": "w3 w5", "k": 5, "base": "10"}).json()["words"]
        expected = lm.next_words("w3 w5", 5, base=10)
        assert [w["word"] for w in proposed] == [w for w, _ in expected]
        assert [w["log_prob"] for w in proposed] == pytest.approx([v for _, v in expected], abs=TOLERANCE)


def test_health_model_and_docs(server: Server, model: tuple[Path, TrainedModel]) -> None:
    lm = model[1]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/health").json()["status"] == "ok"
        info = client.get("/model").json()
        assert info["kind"] == {"input": "embedding", "encoder": "awd-lstm", "output": "softmax"}
        assert (info["vocab_size"], info["parameters"], info["training_corpus"]) == (
            len(lm.vocab),
            lm.model.num_parameters(),
            "synthetic",
        )
        assert info["limits"]["max_sentences"] == 20
        assert "swagger" in client.get("/docs").text.lower()
        schema = client.get("/openapi.json").json()
        assert {"/score", "/next", "/health", "/model"} <= set(schema["paths"])
        assert (
            "sentences"
            in schema["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
        )


BAD = [
    ("post", "/score", b"x" * 5000, 413, "max_body_bytes"),
    ("post", "/score", json.dumps({"sentences": ["w1"] * 21}).encode(), 413, "max_sentences"),
    ("post", "/score", json.dumps({"sentences": [" ".join(["w1"] * 31)]}).encode(), 413, "max_words"),
    ("post", "/next", json.dumps({"prefix": " ".join(["w1"] * 31)}).encode(), 413, "max_words"),
    ("post", "/next", b'{"k": 51}', 422, "max_k"),
    ("post", "/next", b'{"k": 0}', 422, "max_k"),
    ("post", "/score", b'{"sentences": ["w1"', 400, "not valid JSON"),
    ("post", "/score", b"", 400, "not valid JSON"),
    ("post", "/score", b'{"sentences": ["w1 \xff"]}', 400, "not UTF-8"),
    ("post", "/score", b'{"sentences": ["w1 \\ud800"], "words": true}', 400, "surrogate"),
    ("post", "/score", b"[" * 2000 + b"]" * 2000, 400, "nested too deeply"),
    ("post", "/score", b'{"sentences": "w1 w2"}', 422, "sentences"),
    ("post", "/score", b'{"sentences": ["w1", 3]}', 422, "sentences.1"),
    ("post", "/score", b'{"sentences": ["w1"], "base": 2}', 422, "base"),
    ("post", "/score", b'{"sentences": ["w1"], "eos": "yes"}', 422, "eos"),
    ("post", "/score", b'{"sentences": ["w1"], "colour": 1}', 422, "colour"),
    ("post", "/score", b'{"sentences": ["w1"], "ids": ["a", "b"]}', 422, "one id per sentence"),
    ("post", "/score", b"[1, 2]", 422, "ScoreRequest"),
    ("post", "/score", b"{}", 422, "sentences"),
    ("post", "/next", b'{"prefix": "w1 zebra"}', 422, "zebra"),
    ("post", "/next", b'{"k": "5"}', 422, "k"),
    ("get", "/score", b"", 405, "Method Not Allowed"),
    ("get", "/nowhere", b"", 404, "Not Found"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "says"), BAD, ids=[f"{b[3]}-{b[4]}" for b in BAD])
def test_bad_requests_get_their_status_and_a_json_error(
    server: Server, method: str, path: str, body: bytes, status: int, says: str
) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.request(method.upper(), path, content=body or None, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert says in error["error"] or error.get("limit") == says, error
    assert "Traceback" not in reply.text


def test_a_chunked_body_is_cut_at_the_limit(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"sentences": ["'
        for _ in range(100):
            yield b"w1 " * 20

    with httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.post("/score", content=chunks())
    assert reply.status_code == 413 and reply.json()["limit"] == "max_body_bytes"


def test_concurrent_clients_lose_nothing_and_get_the_offline_numbers(
    server: Server, model: tuple[Path, TrainedModel]
) -> None:
    """8 clients x 50 requests of 1-4 sentences, each request bounded by a 20 s timeout."""
    offline = dict(zip(POOL, model[1].score_batch(POOL)))
    before = httpx.get(f"{server.url}/health", timeout=10).json()

    def client_run(seed: int) -> list[tuple[list[str], list[float]]]:
        rng = random.Random(seed)
        done = []
        with httpx.Client(base_url=server.url, timeout=20) as client:
            for _ in range(50):
                sentences = rng.choices(POOL, k=rng.randint(1, 4))
                reply = client.post("/score", json={"sentences": sentences})
                assert reply.status_code == 200, reply.text
                done.append((sentences, [r["log_prob"] for r in reply.json()["results"]]))
        return done

    with ThreadPoolExecutor(8) as pool:
        replies = [pair for run in pool.map(client_run, range(8)) for pair in run]
    assert len(replies) == 400
    for sentences, scores in replies:
        assert scores == pytest.approx([offline[s] for s in sentences], abs=TOLERANCE)
    after = httpx.get(f"{server.url}/health", timeout=10).json()
    assert after["score_requests"] - before["score_requests"] == 400
    assert after["model_calls"] - before["model_calls"] < 400, "concurrent requests shared model calls"


def test_sigterm_answers_the_requests_in_flight_then_exits(model: tuple[Path, TrainedModel], tmp_path: Path) -> None:
    server = Server(model[0], tmp_path / "server.log", "--max-wait-ms", "2000")
    replies: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: replies.append(httpx.post(f"{server.url}/score", json={"sentences": ["w1 w2"]}, timeout=30))
    )
    try:
        request.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health", timeout=10).json()["score_requests_waiting"] == 0:
            assert time.monotonic() < deadline, "the request never reached the server"
            time.sleep(0.02)
        # the request now waits in the batcher (for 2 s) for others to join it
        server.proc.send_signal(signal.SIGTERM)
        request.join(timeout=30)
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop()
    assert replies and replies[0].status_code == 200
    assert replies[0].json()["results"][0]["log_prob"] == pytest.approx(model[1].score("w1 w2"), abs=TOLERANCE)
    assert "stopped on SIGTERM" in server.log.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)


def test_the_batcher_joins_waiting_requests_up_to_its_token_budget() -> None:
    calls: list[list[str]] = []

    def score(sentences: list[str]) -> list[str]:
        calls.append(sentences)
        if "fail" in sentences:
            raise ValueError("boom")
        return [s.upper() for s in sentences]

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(score, executor, max_wait=0.2, max_tokens=6)
            batcher.start()
            first = await asyncio.gather(batcher.submit(["a b"]), batcher.submit(["c"]), batcher.submit(["d e f"]))
            assert first == [["A B"], ["C"], ["D E F"]]
            with pytest.raises(ValueError, match="boom"):
                await batcher.submit(["fail"])
            assert await batcher.submit(["g"]) == ["G"], "the worker goes on after a failed call"
            await batcher.close()

    asyncio.run(scenario())
    # 3 + 2 words fit in 6 tokens; 4 more would not: the third request starts the next call
    assert calls[:2] == [["a b", "c"], ["d e f"]]
    assert calls[2:] == [["fail"], ["g"]]


def test_serve_refuses_a_port_in_use(model: tuple[Path, TrainedModel], capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(model[0]), "--port", str(port)]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", str(model[0]), "--port", "70000"]) == 2
    assert main(["serve", str(model[0]), "--port", "0", "--max-sentences", "0"]) == 2
    assert "--max-sentences 0 must be a positive integer" in capsys.readouterr().err
