"""Synthetic captioned shapes (`shapes`) and a deterministic analyser of them (`analysis`)."""
