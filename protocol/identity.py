"""Node identity: one Ed25519 key that signs protocol messages *and* is the peer's libp2p identity.

* **Key file.** ``Identity.load_or_create()`` reads ``node.key`` from ``$GRPO_SWARM_HOME``, else from
  the user config dir (``platformdirs.user_config_dir("grpo-swarm")`` if platformdirs is installed,
  else ``$XDG_CONFIG_HOME/grpo-swarm`` or ``~/.config/grpo-swarm``), and creates it on first use.
  The file is an unencrypted PKCS#8 PEM Ed25519 private key, created atomically with mode 0600 in
  a 0700 directory. A key file that group or others may read or write is refused (POSIX only).
* **Node id** = ``sha256(raw 32-byte public key)[:16].hex()`` — 32 lowercase hex characters.
* **libp2p / hivemind.** p2pd (and so ``hivemind.DHT(identity_path=...)``) reads a serialised libp2p
  ``PrivateKey`` protobuf: ``{key_type: Ed25519 (1), data: seed(32) || public key(32)}``;
  :meth:`Identity.write_libp2p_identity` writes it. The resulting peer id is the *identity*
  multihash of the serialised libp2p ``PublicKey{Ed25519, pub}`` (``12D3KooW...`` in base58), so
  anyone can recover the signer's public key from a peer id (:func:`public_key_from_peer_id`):
  a peer's DHT id shows who signed. With such a file and ``initial_peers``, pass
  ``check_if_identity_free=False`` to hivemind (its check only understands RSA keys).

Signatures are plain Ed25519 over the bytes given; callers sign domain-tagged bytes (see
:mod:`.canonical`), which can never collide with libp2p's own signed payloads.

* **Verification.** Every signature in the protocol is checked by :func:`verify_signature`, with
  libsodium (PyNaCl): about twice as fast as OpenSSL's Ed25519 on the CPUs measured
  (bench/RESULTS.md), and stricter: it rejects public keys of small order and non-canonical
  encodings, for which OpenSSL accepts trivially forged signatures (e.g. key = the identity point,
  signature = identity point || 0 verifies for *any* message). Signing stays with ``cryptography``;
  Ed25519 signatures are deterministic, so both libraries produce the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.bindings import crypto_sign_open as _sodium_sign_open
from nacl.exceptions import CryptoError as _SodiumError

from .errors import ProtocolError, ReasonCode

KEY_FILE_NAME = "node.key"
HOME_ENV = "GRPO_SWARM_HOME"
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
NODE_ID_HEX_CHARS = 32
MAX_KEY_FILE_BYTES = 64 * 1024

# libp2p crypto.proto: KeyType.Ed25519 = 1; PublicKey/PrivateKey {key_type = 1; data = 2}
LIBP2P_ED25519 = 1
_LIBP2P_PUB_PREFIX = bytes([0x08, LIBP2P_ED25519, 0x12, PUBLIC_KEY_SIZE])
_LIBP2P_PRIV_PREFIX = bytes([0x08, LIBP2P_ED25519, 0x12, 2 * PUBLIC_KEY_SIZE])
_IDENTITY_MULTIHASH = bytes([0x00, len(_LIBP2P_PUB_PREFIX) + PUBLIC_KEY_SIZE])  # code 0x00, length 36
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class IdentityError(Exception):
    """A key file cannot be created, read or trusted. The message names the path and the fix."""


class KeyPermissionError(IdentityError):
    """The key file is readable or writable by group or others."""


def default_home() -> Path:
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs
    except ImportError:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return Path(base) / "grpo-swarm"
    return Path(platformdirs.user_config_dir("grpo-swarm"))


def default_key_path() -> Path:
    return default_home() / KEY_FILE_NAME


def node_id_from_public_key(public_key: bytes) -> str:
    """``sha256(public_key)[:16].hex()``; raises ValueError unless ``public_key`` is 32 bytes."""
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes")
    return hashlib.sha256(bytes(public_key)).digest()[: NODE_ID_HEX_CHARS // 2].hex()


def verify_signature(public_key_bytes: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` by that key.

    libsodium's ``crypto_sign_open``: RFC 8032 verification that also requires S < L and rejects
    public keys that are non-canonical or of small order, and small-order R.

    Never raises: any malformed key, signature or argument type gives False.
    """
    try:
        # lengths before and after conversion: libsodium reads 32 key bytes from whatever it is given
        # (len() first: bytes(n) of an int would allocate n bytes)
        if len(public_key_bytes) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
            return False
        if type(public_key_bytes) is not bytes or type(signature) is not bytes:
            public_key_bytes, signature = bytes(public_key_bytes), bytes(signature)
            if len(public_key_bytes) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
                return False  # e.g. a memoryview of 32 wider items
        if type(message) is not bytes:
            message = bytes(message)
        _sodium_sign_open(signature + message, public_key_bytes)
        return True
    except (_SodiumError, ValueError, TypeError):
        return False
    except Exception:  # noqa: BLE001 - garbage in must never crash a verifier
        return False


# ---- libp2p peer ids -----------------------------------------------------------------------------
def libp2p_public_key(public_key: bytes) -> bytes:
    """Serialised libp2p ``PublicKey{key_type: Ed25519, data: public_key}``."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes")
    return _LIBP2P_PUB_PREFIX + bytes(public_key)


def peer_id_from_public_key(public_key: bytes) -> bytes:
    """The libp2p peer id (identity multihash, 38 bytes) of an Ed25519 public key."""
    return _IDENTITY_MULTIHASH + libp2p_public_key(public_key)


def public_key_from_peer_id(peer_id: bytes | str) -> bytes:
    """Recover the 32-byte Ed25519 public key from a peer id (raw bytes or base58 string).

    Raises ProtocolError(MALFORMED) for anything that is not an Ed25519 identity-multihash peer id
    (e.g. RSA peer ids, which are sha256 hashes and do not contain the key).
    """
    if isinstance(peer_id, str):
        peer_id = base58_decode(peer_id)
    if not isinstance(peer_id, (bytes, bytearray)):
        raise ProtocolError(ReasonCode.MALFORMED, f"peer id must be bytes or str, got {type(peer_id).__name__}")
    prefix = _IDENTITY_MULTIHASH + _LIBP2P_PUB_PREFIX
    if len(peer_id) != len(prefix) + PUBLIC_KEY_SIZE or not bytes(peer_id).startswith(prefix):
        raise ProtocolError(ReasonCode.MALFORMED, "not an Ed25519 libp2p peer id (identity multihash of the key)")
    return bytes(peer_id[len(prefix) :])


def base58_encode(data: bytes) -> str:
    """Bitcoin-alphabet base58 (as libp2p peer ids are printed)."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def base58_decode(text: str) -> bytes:
    """Inverse of :func:`base58_encode`; ProtocolError(MALFORMED) on bad characters or length."""
    if not isinstance(text, str) or len(text) > 256:
        raise ProtocolError(ReasonCode.MALFORMED, "base58 text must be a str of at most 256 characters")
    n = 0
    for ch in text:
        i = _B58.find(ch)
        if i < 0:
            raise ProtocolError(ReasonCode.MALFORMED, f"invalid base58 character {ch!r}")
        n = n * 58 + i
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * pad + body


# ---- key files -----------------------------------------------------------------------------------
def _check_mode(path: Path, st: os.stat_result) -> None:
    if os.name != "posix":
        return
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyPermissionError(
            f"refusing to use key file {path}: mode {mode:04o} lets group/others read or write it; "
            f"run `chmod 600 {path}` (or delete it to create a new identity)"
        )


def _write_exclusive(path: Path, data: bytes) -> bool:
    """Atomically create ``path`` (mode 0600) holding ``data``; False if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if os.name == "posix":
                os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, never replaces an existing file (a concurrent first use)
        except FileExistsError:
            return False
        except OSError:  # filesystem without hard links: exclusive create + write
            try:
                fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "wb") as f:
                f.write(data)
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


class Identity:
    """An Ed25519 private key with the node id, signing and libp2p helpers."""

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None):
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"Identity needs an Ed25519PrivateKey, got {type(private_key).__name__}")
        self._key = private_key
        self.path = path
        self._pub = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    # -- construction --
    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from a 32-byte seed (tests, golden vectors)."""
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Identity:
        """Load a PEM key file, refusing one that group/others can access. Raises IdentityError."""
        path = Path(path).expanduser()
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise IdentityError(f"key file {path} does not exist") from None
        except OSError as e:
            raise IdentityError(f"cannot open key file {path}: {e.strerror or e}") from None
        with os.fdopen(fd, "rb") as f:
            _check_mode(path, os.fstat(f.fileno()))
            data = f.read(MAX_KEY_FILE_BYTES + 1)
        if len(data) > MAX_KEY_FILE_BYTES:
            raise IdentityError(f"key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key file")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise IdentityError(f"key file {path} is encrypted; grpo-swarm needs an unencrypted key") from None
        except (ValueError, UnsupportedAlgorithm) as e:
            raise IdentityError(f"key file {path} is not a PEM private key ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key, path)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike | None = None) -> Identity:
        """Load the key at ``path`` (default :func:`default_key_path`), creating it on first use."""
        path = Path(path).expanduser() if path is not None else default_key_path()
        if not path.exists() and not path.is_symlink():
            fresh = cls.generate()
            try:
                created = _write_exclusive(path, fresh.private_key_pem())
            except OSError as e:
                raise IdentityError(f"cannot create key file {path}: {e}") from None
            if created:
                fresh.path = path
                return fresh
            # another process created it first: use theirs
        return cls.load(path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write this key to a new file (mode 0600). Raises IdentityError if the file exists."""
        path = Path(path).expanduser()
        if not _write_exclusive(path, self.private_key_pem()):
            raise IdentityError(f"key file {path} already exists; refusing to overwrite it")
        self.path = path
        return path

    # -- properties --
    @property
    def public_key_bytes(self) -> bytes:
        return self._pub

    @property
    def node_id(self) -> str:
        return node_id_from_public_key(self._pub)

    @property
    def peer_id(self) -> bytes:
        """libp2p peer id (raw multihash bytes) for this key."""
        return peer_id_from_public_key(self._pub)

    @property
    def peer_id_base58(self) -> str:
        return base58_encode(self.peer_id)

    def private_key_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    # -- signing --
    def sign(self, message: bytes) -> bytes:
        return self._key.sign(bytes(message))

    def verify(self, message: bytes, signature: bytes) -> bool:
        return verify_signature(self._pub, message, signature)

    # -- libp2p --
    def to_libp2p_private_key(self) -> bytes:
        """Serialised libp2p ``PrivateKey{Ed25519, seed || pub}``: the file format of p2pd's ``-id``
        and of ``hivemind.DHT(identity_path=...)`` / ``hivemind.P2P.create(identity_path=...)``."""
        seed = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return _LIBP2P_PRIV_PREFIX + seed + self._pub

    def write_libp2p_identity(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_libp2p_private_key` to ``path`` (mode 0600) for hivemind's ``identity_path``.

        An existing file with the same content is kept; a different one raises IdentityError.
        """
        path = Path(path).expanduser()
        data = self.to_libp2p_private_key()
        if _write_exclusive(path, data):
            return path
        try:
            fd = os.open(path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                _check_mode(path, os.fstat(f.fileno()))
                same = f.read(len(data) + 1) == data
        except OSError as e:
            raise IdentityError(f"cannot read existing identity file {path}: {e}") from None
        if not same:
            raise IdentityError(f"{path} already holds a different libp2p identity; remove it or pick another path")
        return path

    def __repr__(self) -> str:
        return f"Identity(node_id={self.node_id}, path={self.path})"
