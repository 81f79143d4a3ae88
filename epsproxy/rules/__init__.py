"""
Pure rules: the formats and checks every program shares (settings forms, change records
and their signatures, certificates, settings files).  Nothing here imports Twisted's
reactor or opens a socket, so every rule is tested with plain values.
"""
