"""Helpers shared by the tests (importable as ``helpers``: pytest puts
``tests/`` on sys.path, see ``pythonpath`` in pyproject.toml).

- ``cli``: the one way the tests run the cloneaware CLI (a fresh process, or
  the fast forked ``CliServer``);
- ``archivecraft``: hostile and damaged archives built record by record, and
  independent descriptions of trees;
- ``treeutil``: trees with every kind of entry and metadata, snapshots of
  them, backup/restore round trips through the CLI;
- ``fsutil``: independent views of extents (filefrag, xfs_io) and file builders;
- ``netns``: two network namespaces and a real sshd for the ssh:// tests.

Nothing here adds the source tree to sys.path: the cloneaware under test is
the one installed for the interpreter running pytest."""
