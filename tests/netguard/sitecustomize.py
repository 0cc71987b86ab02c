"""The tests' network guard. tests/conftest.py puts this folder first on PYTHONPATH, so Python runs this file at
the start of the test process and of every process the tests start (subprocesses, torchrun's workers). It
refuses any name lookup or connection to a host other than this machine -- loopback stays open for torchrun's
gloo -- and appends each refused attempt to the file named by $TACO_NETWORK_LOG; after each test conftest.py
reads that file and fails the test that made an attempt, naming it and the host.

With TACO_OFFLINE=1 (conftest.py sets it) torch.hub's downloader refuses at once, without a connection, as
clip_text.reachable() answers False: code that would fetch torchvision weights takes its "unavailable" path."""
import errno
import ipaddress
import os
import socket
import sys

LOG = "TACO_NETWORK_LOG"
LOCAL_NAMES = {None, "", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_local(host):
    """Is `host` (a name, an address, bytes or None) this machine?"""
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in LOCAL_NAMES or host == socket.gethostname():
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def refuse(kind, host, port):
    """Record the attempt (for conftest.py) and return the error to raise."""
    what = f"{kind} {host!r} port {port!r}"
    path = os.environ.get(LOG)
    if path:
        line = f"{what} (pid {os.getpid()}: {' '.join(sys.argv)[:200]})\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode(errors="replace"))                  # one write: whole lines from any process
        finally:
            os.close(fd)
    return what


def install():
    """Wrap the socket module's lookups and connects (once per process)."""
    if getattr(socket, "_taco_guarded", False):
        return
    socket._taco_guarded = True
    getaddrinfo, gethostbyname, gethostbyname_ex = socket.getaddrinfo, socket.gethostbyname, socket.gethostbyname_ex
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded_getaddrinfo(host, port, *args, **kwargs):
        if not is_local(host):
            raise socket.gaierror(socket.EAI_NONAME, "the tests' network guard refused "
                                  + refuse("a lookup of", host, port))
        return getaddrinfo(host, port, *args, **kwargs)

    def guarded_by_name(original):
        def lookup(host):
            if not is_local(host):
                raise socket.gaierror(socket.EAI_NONAME, "the tests' network guard refused "
                                      + refuse("a lookup of", host, None))
            return original(host)
        return lookup

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) \
                and not is_local(address[0]):
            raise OSError(errno.ENETUNREACH, "the tests' network guard refused "
                          + refuse("a connection to", address[0], address[1]))

    def guarded_connect(self, address):
        check(self, address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        check(self, address)
        return connect_ex(self, address)

    socket.getaddrinfo = guarded_getaddrinfo
    socket.gethostbyname, socket.gethostbyname_ex = guarded_by_name(gethostbyname), guarded_by_name(gethostbyname_ex)
    socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex


def refuse_downloads(hub):
    """torch.hub's downloader, offline by decision: it raises before any connection."""
    def download_url_to_file(url, *args, **kwargs):
        raise OSError(f"TACO_OFFLINE=1: no download of {url}")
    hub.download_url_to_file = download_url_to_file


class AfterImport:
    """A meta-path finder that lets `module` import as usual, then hands it to `patch` (torch is not imported
    here: most processes that start need it, none should pay for it twice)."""

    def __init__(self, module, patch):
        self.module, self.patch = module, patch

    def find_spec(self, name, path=None, target=None):
        if name != self.module:
            return None
        import importlib.machinery
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_then_patch(module):
            exec_module(module)
            patch(module)
        spec.loader.exec_module = exec_then_patch
        return spec


install()
if os.environ.get("TACO_OFFLINE") == "1":
    if "torch.hub" in sys.modules:
        refuse_downloads(sys.modules["torch.hub"])
    else:
        sys.meta_path.insert(0, AfterImport("torch.hub", refuse_downloads))
