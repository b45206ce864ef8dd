"""Modules moeconv builds: the MoE block and the helpers around it."""
from moeconv.nn.moe import MoEBlock, RoutingConfig
from moeconv.nn.experts import SplitFfn

__all__ = ["MoEBlock", "RoutingConfig", "SplitFfn"]
