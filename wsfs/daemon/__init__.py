"""The running daemon and what surrounds it; nothing here is imported by the layers below.

serve: the Daemon (lease, recovery, pyfuse3 + trio, signals, final flush); workspace: creating
a workspace and bringing a cache dir up to date; lease: the single-writer lease; conflicts:
conflict copies of a set-aside cache dir; control and status: the daemon's status file and
sync requests, and the client side of both; metrics: --metrics; preflight: what a mount needs
of the machine; readahead: the kernel's readahead window of the mount.

Kept free of imports so that an offline command can use one module here (the lease, the
status) without loading pyfuse3 and the flusher.
"""
