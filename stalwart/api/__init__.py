"""stalwart's REST API: the server (an ASGI app in a detached Ray actor) and what it shares with clients.

`protocol` is what both ends agree on (the token file, the code package, the limits) and imports
neither Ray nor the web stack, so the HTTP client (`stalwart.client.HttpClient`) and the CLI use it
cheaply. `app` is the ASGI app over the same `Client` calls as the CLI; `server` runs it, next to the
controller; `packages` keeps the jobs' code where Ray's nodes fetch it.
"""
