"""Fault injection: Redis killed, paused, restarted empty, full, misconfigured, failed over."""
