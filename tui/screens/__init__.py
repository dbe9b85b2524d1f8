"""The wizard's screens, one file each."""
