"""Files in and out: whole-or-nothing writes (`atomic`), refused writes explained (`storage`), untrusted
files read as data (`safe_load`), outputs checked before work (`outputs`) and tables (`tables`).

This folder imports nothing of musicvae but `musicvae.errors`, so every other layer may use it.
"""
