"""The scheduler's jobs, one a module: runners (their state), admission, leases, room (eviction),
renewal, threads, lifecycle (start and unload), shutdown, and the waits they share; the Scheduler in
daemon.scheduler composes them."""
