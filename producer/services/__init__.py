"""The long-running loops: the reconciler (leases, lost messages), the webhook
dispatcher, and what it is built on (webhook signing and delivery, the dispatchers'
queue). The worker runs the reconciler too; it imports nothing else from here.
"""
