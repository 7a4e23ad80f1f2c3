"""The client against a server that lies, a URL that is no ppvit server, and a user's slips (hostile tester,
session 20): the key never leaves, the server's word does not weaken the encryption, one line for each mistake."""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import one_line_error, run_cli
from PIL import Image

from ppvit.cli import client as client_cli
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Geometry, Key
from ppvit.serve.client import Client, ServerError


def fake_server(answer) -> tuple[Client, list[httpx.Request]]:
    """A client whose server is ``answer(request) -> httpx.Response``; the requests it got, bodies read."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return answer(request)

    return Client("http://server.test", "t0ken", transport=httpx.MockTransport(handler)), seen


def adapter_info(key: Key, scheme: str, block: int, size: int = 8) -> dict:
    return {"scheme": scheme, "block_size": block, "input_size": size, "key_fingerprint": key.fingerprint, "version": 1}


def test_a_server_cannot_make_the_client_upload_a_file_it_did_not_offer(
    tmp_path: Path, toy_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server answering the declaration with ``missing: ["../k.key"]`` received the key file, secret and all."""
    key_file = tmp_path / "k.key"
    Key.generate().save(key_file)
    shards = tmp_path / "wds"
    argv = ["encrypt", toy_dataset, shards, "--key", key_file, "--block-size", "4", "--format", "wds"]
    assert run_cli(argv, capsys)[0] == 0
    secret = key_file.read_bytes()

    def hostile(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and request.url.path == "/v1/datasets/toy":
            return httpx.Response(200, json={"missing": ["../k.key", "/etc/hostname"]})
        return httpx.Response(200, json={"name": "toy"})

    client, seen = fake_server(hostile)
    with pytest.raises(ServerError, match="asked for files this client did not offer: refusing"):
        client.upload(shards, "toy")
    assert len(seen) == 1 and all(secret not in r.content for r in seen)
    with pytest.raises(ValueError, match=r"dataset name 'x\?y': use 1-64 letters"):
        client.upload(shards, "x?y")  # it declared dataset "x" and sent the shards to /v1/datasets/x
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("stated", "pin", "scheme_flag", "refused"),
    [
        (("negpos", 8), None, None, True),  # the server chose a scheme that left the image all but plain
        (("channel", 4), None, None, True),
        (("shuffle", 4), None, None, False),
        (("negpos", 8), None, "negpos", False),  # the caller said so
        (("negpos", 8), ("negpos", 8, 8), None, False),  # the key pins it
    ],
    ids=["negpos unpinned", "channel unpinned", "shuffle unpinned", "negpos asked for", "negpos pinned"],
)
def test_without_a_pin_the_server_cannot_choose_a_scheme_that_does_not_shuffle(
    stated: tuple[str, int], pin: tuple[str, int, int] | None, scheme_flag: str | None, refused: bool
) -> None:
    key = Key.generate(Geometry(*pin)) if pin else Key.generate()
    client, _ = fake_server(lambda r: httpx.Response(200, json=adapter_info(key, *stated)))
    client.wanted["scheme"] = scheme_flag
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    if refused:
        with pytest.raises(ValueError, match=f"scheme {stated[0]}; without a pin this client encrypts only with"):
            client.encrypt([image], key)
        return
    sent = client.encrypt([image], key)
    np.testing.assert_array_equal(sent, BlockCipher(key, stated[0], stated[1]).encrypt(image[None]))


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"ppvit_abcdef\n# alice's token\n", "not one token (one line of printable ASCII, no spaces)"),
        (b"\xff\xfe token", "not one token"),
        (b"", "not one token"),
    ],
    ids=["two lines", "not ascii", "empty"],
)
def test_a_token_file_that_is_not_one_token_is_named_and_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, says: str
) -> None:
    """A second line went into the header, and httpx's error about it printed the whole token."""
    token = tmp_path / "alice.token"
    token.write_bytes(content)
    argv = ["client", "jobs", "--server", "http://127.0.0.1:9", "--token-file", token]
    err = one_line_error(argv, capsys, f"token file {token}: {says}")
    assert "abcdef" not in err


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://[::1", "server URL 'http://[::1': "),
        ("ftp://host", "not an http:// or https:// URL of a host"),
        ("127.0.0.1:8000", "not an http:// or https:// URL of a host"),
    ],
)
def test_a_server_url_that_cannot_be_one_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, says: str
) -> None:
    (tmp_path / "t").write_text("tok\n")
    one_line_error(["client", "jobs", "--server", url, "--token-file", tmp_path / "t"], capsys, says)


def test_a_server_that_is_not_ppvit_is_said_so_in_one_line() -> None:
    """An HTML error page was printed as ten lines; JSON of another service was a KeyError traceback."""
    page = "<html>\n<head><title>Error response</title></head>\n<body>\n<h1>404</h1>\n</body>\n</html>\n"
    client, _ = fake_server(lambda r: httpx.Response(404, text=page))
    with pytest.raises(ServerError) as refused:
        client.jobs()
    assert "\n" not in str(refused.value) and "(not a ppvit server's answer)" in str(refused.value)
    client, _ = fake_server(lambda r: httpx.Response(200, text="<html>ok</html>"))
    with pytest.raises(ServerError, match=r"answered /v1/jobs with no JSON \(not a ppvit server\?\)"):
        client.jobs()
    client, _ = fake_server(lambda r: httpx.Response(200, json=[{"id": "job-1"}]))
    foreign = r"server http://x: an answer without a ppvit server's fields \(KeyError"
    with pytest.raises(ValueError, match=foreign), client_cli._server_errors("http://x"):
        client_cli._job_line(client.jobs()[0])


def test_job_ids_are_not_paths_to_other_resources() -> None:
    """``client job ../adapter`` fetched GET /v1/adapter (and ended in a KeyError traceback)."""
    client, seen = fake_server(lambda r: httpx.Response(200, json={}))
    for bad in ("../adapter", "job-x/../../datasets", "job-1?x=1", ""):
        for call in (client.job, client.cancel, client.activate, client.job_metrics):
            with pytest.raises(ValueError, match="not a job id"):
                call(bad)
    assert seen == []
    client.job("job-0a1b2c")
    assert [r.url.path for r in seen] == ["/v1/jobs/job-0a1b2c"]


def test_when_every_image_fails_the_reason_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ciphertext of another key alone said only "none of the 1 images could be read"."""
    key, other = Key.generate(), tmp_path / "other.key"
    Key.generate().save(other)
    (tmp_path / "src" / "test" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "test" / "c" / "x.png")
    argv = ["encrypt", tmp_path / "src", tmp_path / "enc", "--key", other, "--block-size", "4"]
    assert run_cli(argv, capsys)[0] == 0
    enc = tmp_path / "enc" / "test" / "c" / "x.png"
    client, _ = fake_server(lambda r: httpx.Response(200, json=adapter_info(key, "shuffle", 4)))
    with pytest.raises(ValueError, match=r"none of the 1 images could be used \(first: .*x\.png: .*key fingerprint"):
        client.encrypt([enc], key, failed=[])


def test_client_train_checks_the_dataset_name_before_encrypting(tmp_path: Path, toy_dataset: Path) -> None:
    """`client train "my photos"` encrypted everything, then got a 422 that did not mention --name."""
    Key.generate().save(tmp_path / "k.key")
    args = argparse.Namespace(
        key=str(tmp_path / "k.key"), src=str(toy_dataset), name="my photos", work=str(tmp_path / "work"),
        scheme=None, block_size=None, img_size=None, shard_size=None,
    )  # fmt: skip
    for name in ("my photos", ""):
        with pytest.raises(ValueError, match=r"dataset name .*: use 1-64 letters.*; pass --name"):
            client_cli._train_remote(None, argparse.Namespace(**{**vars(args), "name": name}))
    assert not (tmp_path / "work").exists()


class Service:
    """What `client train` asks of the server once the data are up: one job submitted, looked up, followed."""

    def __init__(self, state: str = "running", follow_error: BaseException | None = None) -> None:
        self.state, self.follow_error, self.submitted = state, follow_error, []

    def upload(self, folder: Path, name: str, on_shard) -> dict:
        return {"name": name}

    def job(self, job_id: str) -> dict:
        return job(job_id, self.state, "toy")

    def submit(self, dataset: str, settings: dict, activate: bool, processes: int) -> dict:
        self.submitted.append(settings)
        return job(f"job-{len(self.submitted)}", "queued", dataset)

    def follow(self, job_id: str, on_update) -> dict:
        if self.follow_error is not None:
            raise self.follow_error
        done = job(job_id, "succeeded", "toy")
        on_update(done)
        return done


def job(jid: str, state: str, dataset: str) -> dict:
    return {
        "id": jid, "state": state, "dataset": dataset, "method": "lora-pe", "model": "m", "epochs": 1,
        "epoch": 0, "train_loss": None, "val_acc": None, "version": None, "error": None,
    }  # fmt: skip


def train_args(tmp_path: Path, toy_dataset: Path, **more: object) -> argparse.Namespace:
    if not (tmp_path / "k.key").exists():
        Key.generate(Geometry("shuffle", 4, 32)).save(tmp_path / "k.key")
    settings = dict(
        key=str(tmp_path / "k.key"), src=str(toy_dataset), name="toy", work=str(tmp_path / "work"), scheme=None,
        block_size=None, img_size=None, shard_size=None, method="lora-pe", model=None, epochs=1, set=None,
        activate=False, processes=1, server="http://s", token_file="t",
    )  # fmt: skip
    return argparse.Namespace(**{**settings, **more})


def test_client_train_run_again_follows_the_job_it_submitted_not_a_second(
    tmp_path: Path, toy_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rerun after a Ctrl-C while following, it submitted a second job on the same data (two versions trained);
    the same command run again follows its job while it runs, and anything else is a new job."""
    args = train_args(tmp_path, toy_dataset)
    first = Service(follow_error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        client_cli._train_remote(first, args)
    assert len(first.submitted) == 1
    again = Service()
    assert client_cli._train_remote(again, args)["id"] == "job-1" and again.submitted == []
    assert "job job-1 on dataset toy is already running: following it" in capsys.readouterr().err
    other = Service()  # another setting: a job of its own
    assert client_cli._train_remote(other, train_args(tmp_path, toy_dataset, set=["lr=0.01"]))["id"] == "job-1"
    assert other.submitted == [{"method": "lora-pe", "model": None, "epochs": 1, "lr": 0.01}]
    ended = Service(state="succeeded")  # the job it submitted has ended: run again, it trains again
    client_cli._train_remote(ended, args)
    assert len(ended.submitted) == 1


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), ServerError(0, "server http://s: no answer")])
def test_a_follow_cut_short_names_the_job_that_goes_on(
    tmp_path: Path, toy_dataset: Path, capsys: pytest.CaptureFixture[str], stop: BaseException
) -> None:
    with pytest.raises(type(stop)):
        client_cli._train_remote(Service(follow_error=stop), train_args(tmp_path, toy_dataset))
    assert "job job-1 goes on on the server: ppvit client job job-1 --server http://s --token-file t" in (
        capsys.readouterr().err
    )


def test_a_shard_over_the_body_timeout_says_to_make_smaller_shards(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-000000.tar").write_bytes(b"x" * 10)
    from ppvit.data.manifest import Manifest, write_manifest

    write_manifest(tmp_path, Manifest("shuffle", 4, 8, "f" * 16, "wds", counts={"train": 1}, complete=True))

    def slow(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(".tar"):
            return httpx.Response(408, json={"error": "the body did not arrive within 30 s"})
        return httpx.Response(200, json={"missing": ["train/shard-000000.tar"]})

    client, _ = fake_server(slow)
    with pytest.raises(ServerError, match="within the server's body timeout; encrypt with a smaller --shard-size"):
        client.upload(tmp_path, "toy")


def test_datasets_are_listed_and_deleted_from_the_client(capsys: pytest.CaptureFixture[str]) -> None:
    """A changed dataset's 409 said "delete it", and the client had no way to."""
    listing = [{"name": "toy", "bytes": 10, "complete": False, "missing": ["a", "b"], "key_fingerprint": "f" * 16}]

    def server(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(200, json={"deleted": request.url.path.rsplit("/", 1)[1]})
        return httpx.Response(200, json=listing)

    client, seen = fake_server(server)
    client_cli._service_call(client, argparse.Namespace(action="datasets"))
    client_cli._service_call(client, argparse.Namespace(action="delete", dataset="toy"))
    out = capsys.readouterr().out.splitlines()
    assert out == [f"toy\t10 bytes\t2 shards missing\tkey fingerprint {'f' * 16}", "dataset toy deleted"]
    assert [(r.method, r.url.path) for r in seen] == [("GET", "/v1/datasets"), ("DELETE", "/v1/datasets/toy")]


def test_the_library_client_never_puts_a_token_of_two_lines_in_a_header() -> None:
    """httpx's error about the header printed the token, over two lines."""
    with pytest.raises(ValueError, match="the API token: not one token") as refused:
        Client("http://server.test", "ppvit_SECRET\n# alice")
    assert "SECRET" not in str(refused.value)


def test_ciphertext_files_sent_as_they_are_need_no_pin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The unpinned-scheme rule is for what this client encrypts: negpos ciphertext files it only forwards (no key)
    were refused by it (second reader)."""
    other = tmp_path / "k.key"
    Key.generate().save(other)
    (tmp_path / "src" / "test" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "test" / "c" / "x.png")
    argv = ["encrypt", tmp_path / "src", tmp_path / "enc", "--key", other, "--block-size", "8", "--scheme", "negpos"]
    assert run_cli(argv, capsys)[0] == 0
    key = Key.load(other)
    client, _ = fake_server(lambda r: httpx.Response(200, json=adapter_info(key, "negpos", 8)))
    sent = client.encrypt([tmp_path / "enc" / "test" / "c" / "x.png"], None)
    assert sent.shape == (1, 8, 8, 3)
