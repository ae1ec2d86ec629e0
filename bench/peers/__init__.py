"""Peers run on flashmem's inputs, each beside full attention: NVIDIA kvpress presses in their own
environment (:mod:`bench.peers.kvpress_peer`, ``python -m bench.run kvpress``) and Hugging Face's
offloaded cache (:mod:`bench.peers.hf_offload`, ``python -m bench.run hf-offload``)."""
