"""graftlib's rewrite passes, one method per module (installed as ``graftlib.passes``)."""
