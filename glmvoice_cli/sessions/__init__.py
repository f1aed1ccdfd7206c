"""What a conversation leaves on disk: the session store, its writer thread, the lock, the catalog."""
