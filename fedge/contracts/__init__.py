"""What the server and the devices share: wire protocol, configuration schema, model and codecs.

Imports nothing from the server side, tracking or scenarios, so a device can load it.
"""
