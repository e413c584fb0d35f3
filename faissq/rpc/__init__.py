"""The search path: wire protocol, the worker's RPC loop, and SearchClient (docs/protocol.md).

protocol.py   request/reply maps, the submit script, encode/decode with every check
batch.py      grouping compatible requests into one engine.search call
server.py     RpcServer: the loop thread of one index inside the worker process
service.py    RpcService: one RpcServer per served index, started when the runtime is ready
stats.py      counters of a loop, recorded once per turn
client.py     SearchClient (threads) and AsyncSearchClient (asyncio)
"""
