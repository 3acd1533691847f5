// A pod process on a client generated from proto/ipc/v1/ipc.proto by protoc-gen-go
// and protoc-gen-go-grpc (the proto's go_package, no M flags), on grpc-go with a
// stock `unix://` target and its defaults. The same steps as python_client.py and
// node_client.js, one JSON line per step, for any_client.rs to check.
//
//	go run . SOCKET NAME   (any_client.rs generates the package and builds this)
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	ipcv1 "github.com/fleet-ipc/fleet-ipc/gen/go/ipc/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"
)

func say(fields map[string]interface{}) {
	line, err := json.Marshal(fields)
	check(err)
	fmt.Println(string(line))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func value(v interface{}) *structpb.Value {
	out, err := structpb.NewValue(v)
	check(err)
	return out
}

func plain(v *structpb.Value) interface{} {
	if v == nil {
		return nil
	}
	return v.AsInterface()
}

func main() {
	socket, name := os.Args[1], os.Args[2]
	conn, err := grpc.Dial("unix://"+socket, grpc.WithInsecure())
	check(err)
	defer conn.Close()
	client := ipcv1.NewIpcClient(conn)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "ipc-app", "shop")
	call := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(ctx, 15*time.Second)
	}

	c, cancel := call()
	pong, err := client.SendMsg(c, &ipcv1.SendMsgRequest{Op: "ping"})
	cancel()
	check(err)
	say(map[string]interface{}{"pong": pong.Reply.Op})

	streamCtx, stop := context.WithCancel(ctx)
	defer stop()
	stream, err := client.Subscribe(streamCtx, &ipcv1.SubscribeRequest{
		Channels: []string{":" + name}, Id: name + "-1", Role: name + "worker",
	})
	check(err)
	first, err := stream.Recv()
	check(err)
	say(map[string]interface{}{"subscribed": first.Op})

	c, cancel = call()
	_, err = client.Broadcast(c, &ipcv1.BroadcastRequest{
		Channel: ":" + name, Op: name + ":hello", Data: value(map[string]interface{}{"x": "one"}),
	})
	cancel()
	check(err)
	for {
		msg, err := stream.Recv()
		check(err)
		if msg.Op == name+":hello" {
			say(map[string]interface{}{"got": plain(msg.Data), "channel": msg.Channel})
			break
		}
	}

	c, cancel = call()
	answer, err := client.SendMsg(c, &ipcv1.SendMsgRequest{
		Target: ":operator", Op: name + ":ask", Data: value(map[string]interface{}{"n": "two"}), TimeoutMs: 10000,
	})
	cancel()
	check(err)
	say(map[string]interface{}{"answer": answer.Reply.Op, "data": plain(answer.Reply.Data)})

	for {
		msg, err := stream.Recv()
		check(err)
		if msg.ReplyTo != "" {
			c, cancel = call()
			_, err = client.Reply(c, &ipcv1.ReplyRequest{ReplyTo: msg.ReplyTo, Op: name + ":answer", Data: msg.Data})
			cancel()
			check(err)
			say(map[string]interface{}{"answered": msg.Op})
			return
		}
	}
}
