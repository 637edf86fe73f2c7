"""Every Hugging Face hub access goes through here: fail fast, name the repository.

Without a network, huggingface_hub, transformers and datasets retry each request for
tens of seconds and end in an error that names no repository. So before the first hub
access of a process we ask the hub once, with a short timeout, whether it answers
(`reachable`, through huggingface_hub's own HTTP session, so HF_ENDPOINT and proxies
apply). When it does not, the access runs as it would under HF_HUB_OFFLINE=1: what is
in the local cache is used, and anything else is one sentence naming the repository
and how to work offline (`access`).

Local paths never come here: a name that looks like a path (`looks_like_local_path`)
and does not exist is a missing local file, not a hub repository.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from elfctl.errors import UserError

PROBE_TIMEOUT_S = 5.0  # one request, no retries: a hub that answers does so well within this

_reachable: dict[str, bool] = {}  # endpoint -> answered, asked once per process


def looks_like_local_path(name: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else that names a path is local."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def check_local(name: str, what: str) -> None:
    """A name that looks like a local path must exist: it is never taken for a hub id."""
    if looks_like_local_path(name) and not Path(name).expanduser().exists():
        raise UserError(f"Could not load {what} '{name}': the folder {name} does not exist.")


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline_by_choice() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): the user said not to use the network."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def reachable() -> bool:
    """Whether the hub answers one request within PROBE_TIMEOUT_S (asked once per process).

    Any HTTP answer below 500 counts: even a 404 proves the hub is there.
    """
    url = endpoint()
    if url not in _reachable:
        from huggingface_hub.utils import get_session

        try:
            response = get_session().head(url, timeout=PROBE_TIMEOUT_S)
            _reachable[url] = response.status_code < 500
        except Exception:  # noqa: BLE001 - any failure to get an answer means the same
            _reachable[url] = False
    return _reachable[url]


@contextmanager
def access(repo_id: str, what: str, *, upload: bool = False) -> Iterator[bool]:
    """Run a block that reads (or, with `upload`, writes) hub repo `repo_id`.

    Yields whether the block runs offline (from the local cache only). Any failure
    inside the block becomes a UserError naming `what` and `repo_id`.
    """
    action = f"upload {what} to" if upload else f"load {what}"
    if offline_by_choice():
        if upload:
            raise UserError(
                f"Cannot upload {what} to '{repo_id}': HF_HUB_OFFLINE is set; unset it on a "
                "machine that can reach the hub."
            )
        with _named_errors(repo_id, action, _offline_by_choice_message(repo_id, what)):
            yield True
        return
    if not reachable():
        if upload:
            raise UserError(
                f"Cannot upload {what} to '{repo_id}': the Hugging Face hub ({endpoint()}) could "
                "not be reached; upload it later from a machine that can reach it."
            )
        with _named_errors(repo_id, action, _unreachable_message(repo_id, what)), _offline_mode():
            yield True
        return
    with _named_errors(repo_id, action, None):
        yield False


def _unreachable_message(repo_id: str, what: str) -> str:
    return (
        f"Could not load {what} '{repo_id}': the Hugging Face hub ({endpoint()}) could not be "
        "reached and it is not in the local cache; pass a local path instead, or download it "
        "on a machine with a network and run with HF_HUB_OFFLINE=1."
    )


def _offline_by_choice_message(repo_id: str, what: str) -> str:
    return (
        f"Could not load {what} '{repo_id}': HF_HUB_OFFLINE is set and it is not in the local "
        "cache; pass a local path instead, or unset HF_HUB_OFFLINE to download it."
    )


@contextmanager
def _named_errors(repo_id: str, action: str, offline_message: str | None) -> Iterator[None]:
    """Library errors of a hub access -> one sentence naming the repository.

    `offline_message` is what any OSError or ValueError means when the block runs
    from the cache only: the files are not there.
    """
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        yield
    except UserError:
        raise
    except GatedRepoError:
        raise UserError(
            f"Could not {action} '{repo_id}': the hub repository is gated; accept its terms "
            "on the hub and log in (`hf auth login`)."
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"Could not {action} '{repo_id}': no such hub repository (or it is private: "
            "log in with `hf auth login`)."
        ) from None
    except Exception as e:  # noqa: BLE001 - sorted below; anything else is re-raised
        if offline_message is not None and isinstance(e, (OSError, ValueError)):
            raise UserError(offline_message) from None  # what the libraries raise offline
        if _is_network_error(e):
            raise UserError(
                f"Could not {action} '{repo_id}': the connection to the Hugging Face hub "
                f"({endpoint()}) failed ({type(e).__name__}); try again, or pass a local path."
            ) from None
        if isinstance(e, (OSError, ValueError)):
            raise UserError(f"Could not {action} '{repo_id}': {first_line(e)}") from None
        raise


def first_line(error: BaseException) -> str:
    """The first line of an error's message, as the end of one of our sentences."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__).rstrip(".") + "."


def _is_network_error(error: BaseException) -> bool:
    """A connection failure, in any of the forms the hub libraries wrap it in."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests"):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def _offline_mode() -> Iterator[None]:
    """What HF_HUB_OFFLINE=1 at start-up would do, for one block: the cache only.

    huggingface_hub (and transformers, which asks it) reads its switch at call time;
    datasets copies it when imported, so a loaded datasets' copy is switched too. One
    imported inside the block keeps the offline copy, as it should: this process found
    the hub unreachable and does not ask again.
    """
    from huggingface_hub import constants

    switches = [(constants, "HF_HUB_OFFLINE")]
    if "datasets.config" in sys.modules:
        switches.append((sys.modules["datasets.config"], "HF_HUB_OFFLINE"))
    saved = [(module, name, getattr(module, name)) for module, name in switches]
    try:
        for module, name in switches:
            setattr(module, name, True)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
