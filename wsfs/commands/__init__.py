"""The commands a user runs: the top floor, importing everything below and imported by nothing.

cli: `wsfs` and its verbs, user-facing errors and exit codes; options: every mount option
once (flag, -o key, WSFS_ variable); mount and unmount; run: `wsfs run`, the container
entrypoint; mounthelper: mount(8)'s `mount.wsfs`; fsck; admin/: the offline verbs (ls, du,
gc, destroy, recover); credentials: where a command's store keys come from.
"""
