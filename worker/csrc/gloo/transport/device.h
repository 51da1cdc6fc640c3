// Declaration-only stand-in; see gloo/rendezvous/store.h.
#pragma once
#include "../rendezvous/store.h"
